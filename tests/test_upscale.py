"""``selftransfer script`` and ``selftransfer upscale``: the generated .vpy, the vspipe | ffmpeg pipeline, what it
keeps from the source, and that no failure or kill ever leaves a file named OUT.

Tests marked "plumbing" replace the filter with a 2x bicubic resize (and skip the plugin preflight), so they check
this module's process handling and muxing without needing the native plugin; the others run the real plugin and
skip with a reason when it cannot be loaded.
"""
from __future__ import annotations

import ast
import collections
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from selftransfer_trainer.cli import main
from vs_selftransfer.errors import UserError
from vs_selftransfer.files import current_umask
from vs_selftransfer.pipeline import media as mux, process, upscale as up
from vs_selftransfer.pipeline import options as opts, progress as prog, script as vpy

pytestmark = pytest.mark.skipif(not (shutil.which("ffmpeg") and shutil.which("ffprobe")),
                                reason="ffmpeg and ffprobe are needed (apt install ffmpeg)")

FRAMES = 12


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *map(str, args)], check=True)


def ffprobe(path, *entries):
    done = subprocess.run(["ffprobe", "-v", "error", "-of", "json", *entries, str(path)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)


def streams_of(path):
    return ffprobe(path, "-show_streams", "-count_packets")["streams"]


def audio_packets(path) -> tuple[str, str, int]:
    """Codec, md5 of every audio packet's payload in order, packet count."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        md5 = hashlib.md5()
        count = 0
        for packet in container.demux(stream):
            if packet.size:
                md5.update(bytes(packet))
                count += 1
        return stream.codec_context.name, md5.hexdigest(), count


@pytest.fixture(scope="module")
def media(tmp_path_factory, clip_path) -> SimpleNamespace:
    """Short 320x180 versions of the shared clip, with its AAC audio, plus variants with subtitles/chapters."""
    d = tmp_path_factory.mktemp("upscale_media")
    small = d / "small.mp4"
    ffmpeg("-i", clip_path, "-frames:v", FRAMES, "-t", FRAMES / 25, "-vf", "scale=320:180", "-c:v", "libx264",
           "-preset", "veryfast", "-crf", "18", "-c:a", "copy", small)
    srt = d / "subs.srt"
    srt.write_text("1\n00:00:00,100 --> 00:00:00,400\nhello <i>bunny</i>\n")
    chapters = d / "chapters.txt"
    chapters.write_text(";FFMETADATA1\ntitle=Bunny\n[CHAPTER]\nTIMEBASE=1/1000\nSTART=0\nEND=200\ntitle=Opening\n"
                        "[CHAPTER]\nTIMEBASE=1/1000\nSTART=200\nEND=480\ntitle=Rest\n")
    subs_mkv, subs_mp4 = d / "subs.mkv", d / "subs.mp4"
    common = ["-i", small, "-i", srt, "-i", chapters, "-map", "0", "-map", "1", "-map_metadata", "2",
              "-map_chapters", "2", "-c", "copy", "-metadata:s:s:0", "language=eng"]
    ffmpeg(*common, subs_mkv)
    ffmpeg(*common, "-c:s", "mov_text", subs_mp4)
    late = d / "late_video.mkv"  # the video starts 0.2 s after the audio
    ffmpeg("-i", small, "-itsoffset", "0.2", "-i", small, "-map", "1:v", "-map", "0:a", "-c", "copy", late)
    gray = d / "gray.mkv"
    ffmpeg("-i", small, "-vf", "format=gray", "-c:v", "ffv1", "-an", gray)
    ten_bit = d / "ten_bit.mkv"
    ffmpeg("-i", small, "-pix_fmt", "yuv420p10le", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-an",
           ten_bit)
    rotated = d / "rotated.mp4"  # a phone video: stored 320x180, shown 180x320
    try:
        ffmpeg("-display_rotation", "90", "-i", small, "-c", "copy", rotated)  # ffmpeg >= 6
    except subprocess.CalledProcessError:
        ffmpeg("-i", small, "-c", "copy", "-metadata:s:v:0", "rotate=90", rotated)  # ffmpeg 5
    vfr = d / "vfr.mkv"  # frames 0-5 last 40 ms, the others 80 ms
    ffmpeg("-i", small, "-vf", "setpts='if(lt(N,6),N*0.04,0.24+(N-6)*0.08)/TB'", "-fps_mode", "vfr", "-an",
           "-c:v", "libx264", "-preset", "veryfast", vfr)
    audio_only = d / "audio_only.m4a"
    ffmpeg("-i", small, "-vn", "-c:a", "copy", audio_only)
    text = d / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    empty = d / "empty.mp4"
    empty.touch()
    truncated = d / "truncated.mp4"
    truncated.write_bytes(small.read_bytes()[: small.stat().st_size // 2])
    return SimpleNamespace(dir=d, small=small, subs_mkv=subs_mkv, subs_mp4=subs_mp4, late=late, gray=gray,
                           ten_bit=ten_bit, rotated=rotated, vfr=vfr, audio_only=audio_only, text=text, empty=empty,
                           truncated=truncated)


def resize_script(source, model, options, *, index_cache=True, model_summary="", fail_at=None, sleep=0.0):
    """Stands in for build_script in plumbing tests: BestSource -> 2x bicubic [-> slow] [-> fails at a frame]."""
    text = ("import time\nimport vapoursynth as vs\ncore = vs.core\n"
            f"clip = core.bs.VideoSource(source={os.path.abspath(source)!r}, cachemode=0)\n"
            "clip = core.resize.Bicubic(clip, clip.width * 2, clip.height * 2)\n")
    if fail_at is not None or sleep:
        text += textwrap.dedent(f"""\
            def frame(n, f):
                time.sleep({sleep})
                if {fail_at!r} is not None and n >= {fail_at!r}:
                    raise ValueError(f"frame {{n}} is cursed")
                return f
            clip = core.std.ModifyFrame(clip, clip, frame)
            """)
    return text + "clip.set_output()\n"


@pytest.fixture
def plumbing(monkeypatch):
    """Upscale through a plain resize; returns a setter for frame failure / slowness."""
    settings = {}
    monkeypatch.setattr(up, "build_script", lambda *a, **k: resize_script(*a, **k, **settings))
    monkeypatch.setattr(up, "preflight", lambda *a, **k: None)
    return settings


@pytest.fixture(scope="session")
def plugin() -> None:
    """Fail unless vspipe can load core.selftransfer (installed package, or a dev build on the extra path)."""
    vspipe = mux.find_tools().vspipe
    probe_script = Path(os.environ.get("TMPDIR", "/tmp")) / f"selftransfer-plugin-check-{os.getpid()}.vpy"
    probe_script.write_text("import vapoursynth as vs\nvs.core.selftransfer.Version()\n"
                            "vs.core.std.BlankClip(length=1).set_output()\n")
    try:
        done = subprocess.run([vspipe, "--info", str(probe_script), "-"], capture_output=True, text=True,
                              env=mux.vspipe_env(), timeout=120)
    finally:
        probe_script.unlink()
    last = (done.stderr.strip().splitlines() or ["(no error output)"])[-1]
    assert done.returncode == 0, f"vspipe cannot load the selftransfer VapourSynth plugin: {last}"


def run(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if process.PARTIAL_MARK in p.name)


# -- the script ----------------------------------------------------------------------------------------------

def _assignments(tree) -> dict:
    return {node.targets[0].id: node.value for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def _call(tree, dotted: str) -> ast.Call:
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted]
    assert len(calls) == 1, f"expected one call of {dotted}"
    return calls[0]


def test_script_embeds_paths_safely_and_passes_only_given_options(tmp_path):
    odd = tmp_path / "it's a \"test\" \\ vidéo [1].mp4"
    options = opts.FilterOptions(backend="ort", tilesize=(200, 0), num_streams=2)
    text = vpy.build_script(odd, "model.stm", options, model_summary="carn_m, x2")
    tree = ast.parse(text)
    values = _assignments(tree)
    assert ast.literal_eval(values["SOURCE"]) == str(odd)
    assert ast.literal_eval(values["MODEL"]) == os.path.abspath("model.stm")
    upscale = _call(tree, "core.selftransfer.Upscale")
    assert ast.unparse(upscale.args[0]) == "clip"
    assert {k.arg: ast.unparse(k.value) for k in upscale.keywords} == {
        "model": "MODEL", "backend": "'ort'", "tilesize": "[200, 0]", "num_streams": "2"}
    source = _call(tree, "core.bs.VideoSource")
    kw = {k.arg: ast.unparse(k.value) for k in source.keywords}
    assert kw["source"] == "SOURCE" and kw["cachemode"] == "1" and kw["cachepath"] == "INDEX_CACHE"
    assert "set_output()" in text and "#   overlap" in text  # the knobs are documented for people who edit it

    plain = ast.parse(vpy.build_script(odd, "model.stm", opts.FilterOptions(), index_cache=False))
    assert [k.arg for k in _call(plain, "core.selftransfer.Upscale").keywords] == ["model"]
    kw = {k.arg: ast.unparse(k.value) for k in _call(plain, "core.bs.VideoSource").keywords}
    assert kw == {"source": "SOURCE", "cachemode": "0"}  # the one-shot run writes no index anywhere


def test_tilesize_and_option_parsing():
    assert opts._parse_tilesize("256") == (256,)
    assert opts._parse_tilesize("320x0") == (320, 0)
    assert opts.FilterOptions(tilesize=(256,)).plugin_kwargs() == {"tilesize": 256}
    for bad in ("abc", "12x", "-5", "1x2x3"):
        with pytest.raises(UserError, match="--tilesize"):
            opts._parse_tilesize(bad)
    with pytest.raises(UserError, match="--num-streams"):
        opts.FilterOptions(num_streams=0).validate()
    with pytest.raises(UserError, match="--device"):
        opts.FilterOptions(device="tpu").validate()
    assert opts.FilterOptions(precision="auto", reuse=0).plugin_kwargs() == {"precision": "auto", "reuse": 0}
    with pytest.raises(UserError, match="--reuse"):
        opts.FilterOptions(reuse=2).validate()


def test_script_command_prints_or_writes(media, tiny_bundle, tmp_path, capsys):
    rc = main(["script", str(media.small), "--model", str(tiny_bundle), "--backend", "ort"])
    captured = capsys.readouterr()
    assert rc == 0
    tree = ast.parse(captured.out)
    assert ast.literal_eval(_assignments(tree)["SOURCE"]) == str(media.small)
    out = tmp_path / "up.vpy"
    assert run(capsys, "script", media.small, "--model", tiny_bundle, "-o", out, "--backend", "ort")[0] == 0
    assert out.read_text() == captured.out
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    rc, err = run(capsys, "script", media.small, "--model", tiny_bundle, "-o", out, "--tilesize", "64")
    assert rc == 2 and "already exists" in err and out.read_text() == captured.out
    assert run(capsys, "script", media.small, "--model", tiny_bundle, "-o", out, "--force", "--tilesize", "64",
               "--reuse", "0")[0] == 0
    assert "tilesize=64, reuse=0)" in out.read_text()
    rc, err = run(capsys, "script", media.small, "--model", tmp_path / "nope.stm")
    assert rc == 2 and "not found" in err


def test_script_evaluates_in_vspipe_without_writing_beside_the_video(plugin, media, tiny_bundle, tmp_path, capsys):
    vspipe = mux.find_tools().vspipe
    env = {**mux.vspipe_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    before = sorted(os.listdir(media.dir))
    for video, fmt in ((media.small, "YUV420P8"), (media.gray, "Gray8")):
        script = tmp_path / f"{video.stem}.vpy"
        assert run(capsys, "script", video, "--model", tiny_bundle, "-o", script)[0] == 0
        done = subprocess.run([vspipe, "--info", str(script), "-"], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        info = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
        assert (info["Width"], info["Height"], info["Frames"], info["Format Name"]) == ("640", "360", "12", fmt)
    assert sorted(os.listdir(media.dir)) == before  # BestSource's index went to the cache, not beside the video


# -- upscale: the real filter ----------------------------------------------------------------------------------

def test_upscale_end_to_end_keeps_audio(plugin, media, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "small_x2.mkv"
    rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle)
    assert rc == 0, err
    video, audio = (next(s for s in streams_of(out) if s["codec_type"] == kind) for kind in ("video", "audio"))
    assert (video["codec_name"], video["width"], video["height"]) == ("h264", 640, 360)
    assert int(video["nb_read_packets"]) == FRAMES
    assert audio_packets(out) == audio_packets(media.small)  # copied: same codec, packets and payloads
    assert f"frames {FRAMES}/{FRAMES}" in err and "fps" in err and "ETA" in err
    assert leftovers(tmp_path) == []


def test_ten_bit_stays_ten_bit(plugin, media, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out.mkv"
    rc, err = run(capsys, "upscale", media.ten_bit, "-o", out, "--model", tiny_bundle)
    assert rc == 0, err
    video = streams_of(out)[0]
    assert (video["width"], video["height"], video["pix_fmt"]) == (640, 360, "yuv420p10le")


FAILING_RUNTIME = """\
import vs_selftransfer.runtime as runtime

_real, _calls = runtime.tiled_upscale, iter(range(1 << 62))


def _failing(*args, **kwargs):  # a backend that breaks from the 5th frame on, inside the real filter
    if next(_calls) >= 4:
        raise RuntimeError("injected backend failure")
    return _real(*args, **kwargs)


runtime.tiled_upscale = _failing
"""


def test_frames_failing_in_the_plugin_leave_no_output(plugin, media, tiny_bundle, tmp_path, capsys, monkeypatch):
    """The real filter fails on frames mid-stream (its runtime raises, as a broken backend would; vspipe's Python
    loads the failure through a sitecustomize): vspipe fails with the filter's message and nothing is left."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_RUNTIME)
    real_env = up.vspipe_env

    def failing_env():
        env = real_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
        return env

    monkeypatch.setattr(up, "vspipe_env", failing_env)
    out = tmp_path / "out.mkv"
    rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle, "--backend", "ort")
    assert rc == 1 and "vspipe failed" in err and "selftransfer.Upscale" in err, err
    assert "injected backend failure" in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_preflight_reports_filter_argument_errors_before_decoding(plugin, media, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out.mkv"
    rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle, "--backend", "trt")
    assert rc == 2 and "selftransfer.Upscale" in err and "backend" in err
    assert not out.exists() and leftovers(tmp_path) == []


# -- upscale: plumbing (a resize stands in for the filter) -----------------------------------------------------

@pytest.mark.parametrize("source,suffix,subtitle_codec", [("subs_mkv", ".mp4", "mov_text"),
                                                          ("subs_mp4", ".mkv", "subrip")])
def test_subtitles_chapters_and_metadata_are_kept(plumbing, media, tiny_bundle, tmp_path, capsys, source,
                                                  suffix, subtitle_codec):
    out = tmp_path / f"out{suffix}"
    rc, err = run(capsys, "upscale", getattr(media, source), "-o", out, "--model", tiny_bundle)
    assert rc == 0, err
    assert f"converted to {'mov_text' if suffix == '.mp4' else 'srt'}" in err  # the container needed another codec
    info = ffprobe(out, "-show_streams", "-show_chapters", "-show_format")
    kinds = collections.Counter(s["codec_type"] for s in info["streams"])
    assert kinds["video"] == 1 and kinds["audio"] == 1
    subtitle = next(s for s in info["streams"] if s["codec_type"] == "subtitle")
    assert subtitle["codec_name"] == subtitle_codec and subtitle["tags"].get("language") == "eng"
    assert [c["tags"]["title"] for c in info["chapters"]] == ["Opening", "Rest"]
    assert info["format"]["tags"].get("title") == "Bunny"
    assert audio_packets(out) == audio_packets(media.small)


@pytest.mark.parametrize("encoder,suffix,codec,tag", [("x265", ".mp4", "hevc", "hvc1"),
                                                      ("ffv1", ".mkv", "ffv1", None)])
def test_encoders(plumbing, media, tiny_bundle, tmp_path, capsys, encoder, suffix, codec, tag):
    out = tmp_path / f"out{suffix}"
    rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle, "--encoder", encoder)
    assert rc == 0, err
    video = next(s for s in streams_of(out) if s["codec_type"] == "video")
    assert (video["codec_name"], video["width"], int(video["nb_read_packets"])) == (codec, 640, FRAMES)
    if tag:
        assert video["codec_tag_string"] == tag


def test_video_start_offset_keeps_sync(plumbing, media, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out.mkv"
    assert run(capsys, "upscale", media.late, "-o", out, "--model", tiny_bundle)[0] == 0
    starts = {s["codec_type"]: float(s["start_time"]) for s in ffprobe(out, "-show_streams")["streams"]}
    assert starts["video"] == pytest.approx(0.2, abs=0.011) and starts["audio"] == pytest.approx(0.0, abs=0.011)


def test_rotated_video_comes_out_upright(plumbing, media, tiny_bundle, tmp_path, capsys):
    from vs_selftransfer.probe import probe

    if probe(media.rotated).rotation not in (90, 270):
        pytest.skip("this ffmpeg could not write a rotated test video")
    out = tmp_path / "out.mkv"
    rc, err = run(capsys, "upscale", media.rotated, "-o", out, "--model", tiny_bundle)
    assert rc == 0, err
    video = streams_of(out)[0]
    assert (video["width"], video["height"]) == (360, 640) and not video.get("side_data_list")


def test_variable_frame_rate_is_warned_about(plumbing, media, tiny_bundle, tmp_path, capsys):
    rc, err = run(capsys, "upscale", media.vfr, "-o", tmp_path / "out.mkv", "--model", tiny_bundle)
    assert rc == 0 and "warning" in err and "variable frame rate" in err, err


def test_failing_frame_leaves_no_output(plumbing, media, tiny_bundle, tmp_path, capsys):
    plumbing["fail_at"] = 5
    out = tmp_path / "out.mkv"
    rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle)
    assert rc == 1 and "vspipe failed" in err, err
    assert re.search(r"frame ([5-9]|1[01]) is cursed", err), err  # frames run in parallel: any of them may fail first
    assert not out.exists() and leftovers(tmp_path) == []


def test_ffmpeg_failure_is_named_and_leaves_no_output(plumbing, media, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out.mkv"
    rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle,
                  "--ffmpeg-args", "-c:v no_such_encoder")
    assert rc == 1 and "ffmpeg failed" in err and "no_such_encoder" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_force_replaces_existing_output(plumbing, media, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out.mkv"
    out.write_bytes(b"old")
    rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle)
    assert rc == 2 and "already exists" in err and out.read_bytes() == b"old"
    assert run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle, "--force")[0] == 0
    assert int(streams_of(out)[0]["nb_read_packets"]) == FRAMES


@pytest.fixture(params=["unnamed", "named"])
def partial_kind(request, monkeypatch) -> str:
    """Both kinds of partial file: Linux's unnamed one (O_TMPFILE), and the mkstemp name used where there is none."""
    if request.param == "named":
        monkeypatch.setattr(process, "_open_unnamed", lambda directory_fd: None)
    else:
        folder = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = process._open_unnamed(folder)
        finally:
            os.close(folder)
        if fd is None:
            pytest.skip("no O_TMPFILE (or no /proc) here")
        os.close(fd)
    return request.param


def test_an_output_that_appears_during_the_encode_is_kept_without_force(partial_kind, plumbing, media, tiny_bundle,
                                                                         tmp_path, capsys):
    out = tmp_path / "out.mkv"
    first = process.PartialFile(out, force=False)  # a run that started while OUT did not exist yet
    try:
        rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle)  # a second one ends first
        assert rc == 0, err
        finished = out.read_bytes()
        os.write(first.fd, b"the first run's encode")
        with pytest.raises(UserError, match="--output .*appeared while this run was encoding.*--force"):
            first.commit()
        assert out.read_bytes() == finished
    finally:
        first.close()
    forced = process.PartialFile(out, force=True)
    try:
        os.write(forced.fd, b"forced")
        forced.commit()
    finally:
        forced.close()
    assert out.read_bytes() == b"forced" and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mkv"]


def test_named_partial_file_on_a_file_system_without_hard_links(monkeypatch, tmp_path):
    """FAT and exFAT have neither O_TMPFILE nor hard links: the named partial file is renamed, still never over an
    OUT that appeared meanwhile unless --force."""
    import errno

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(process, "_open_unnamed", lambda directory_fd: None)
    monkeypatch.setattr(process.os, "link", no_links)
    out = tmp_path / "out.mkv"
    for expected, force in ((b"first", False), (b"first", False), (b"forced", True)):
        partial = process.PartialFile(out, force=force)
        try:
            os.write(partial.fd, b"forced" if force else b"first")
            if out.exists() and not force:
                with pytest.raises(UserError, match="appeared while this run was encoding"):
                    partial.commit()
            else:
                partial.commit()
        finally:
            partial.close()
        assert out.read_bytes() == expected and leftovers(tmp_path) == []


def test_planted_symlinks_and_look_alike_names_are_never_written(partial_kind, plumbing, media, tiny_bundle,
                                                                 tmp_path, capsys):
    """Nothing that exists before the run is written, truncated or removed: not a symlink at the partial file's old
    fixed name, not a file that happens to carry that name, not the target of a symlink at OUT."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.mkv"
    old_name = tmp_path / f".out.mkv{process.PARTIAL_MARK}.mkv"  # where ffmpeg once wrote
    old_name.symlink_to(victim)
    rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle)
    assert rc == 0, err
    assert victim.read_text() == "precious" and old_name.is_symlink() and os.readlink(old_name) == str(victim)
    assert out.is_file() and not out.is_symlink() and int(streams_of(out)[0]["nb_read_packets"]) == FRAMES
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # the user's normal mode, not a temp file's 0600

    # A failing run with the symlink in place: the victim still stands.
    plumbing["fail_at"] = 3
    rc, err = run(capsys, "upscale", media.small, "-o", tmp_path / "failed.mkv", "--model", tiny_bundle)
    assert rc == 1 and victim.read_text() == "precious" and old_name.is_symlink()
    plumbing.clear()

    # OUT itself a symlink: refused without --force; with it, the link is replaced and its target kept.
    linked = tmp_path / "linked.mkv"
    linked.symlink_to(victim)
    rc, err = run(capsys, "upscale", media.small, "-o", linked, "--model", tiny_bundle)
    assert rc == 2 and "--output" in err and "already exists" in err
    assert run(capsys, "upscale", media.small, "-o", linked, "--model", tiny_bundle, "--force")[0] == 0
    assert victim.read_text() == "precious" and linked.is_file() and not linked.is_symlink()
    dangling = tmp_path / "dangling.mkv"
    dangling.symlink_to(tmp_path / "nowhere.mkv")
    rc, err = run(capsys, "upscale", media.small, "-o", dangling, "--model", tiny_bundle)
    assert rc == 2 and "already exists" in err and not (tmp_path / "nowhere.mkv").exists()

    # The input video carries the partial file's old name.
    source = tmp_path / f".again.mkv{process.PARTIAL_MARK}.mkv"
    shutil.copy(media.small, source)
    before = source.read_bytes()
    rc, err = run(capsys, "upscale", source, "-o", tmp_path / "again.mkv", "--model", tiny_bundle)
    assert rc == 0, err
    assert source.read_bytes() == before
    assert leftovers(tmp_path) == sorted([old_name.name, source.name])  # the planted ones, untouched


# -- bad input ------------------------------------------------------------------------------------------------

def _bad_cases(media, bundle: Path, tmp: Path):
    corrupt = tmp / "corrupt.stm"
    corrupt.write_bytes(os.urandom(4096))
    truncated = tmp / "truncated.stm"
    truncated.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    existing = tmp / "exists.mkv"
    existing.write_bytes(b"keep me")
    folder = tmp / "folder.mkv"
    folder.mkdir()
    a_file = tmp / "plain_file"
    a_file.write_text("x")
    out = tmp / "out.mkv"
    ok = ["--model", bundle]
    return {
        "missing input": ([tmp / "missing.mp4", "-o", out, *ok], "no such file", out),
        "directory input": ([tmp, "-o", out, *ok], "directory", out),
        "text file named .mp4": ([media.text, "-o", out, *ok], "", out),
        "audio only": ([media.audio_only, "-o", out, *ok], "no video stream", out),
        "empty file": ([media.empty, "-o", out, *ok], "empty", out),
        "truncated video": ([media.truncated, "-o", out, *ok], "", out),
        "missing model": ([media.small, "-o", out, "--model", tmp / "missing.stm"], "not found", out),
        "corrupt model": ([media.small, "-o", out, "--model", corrupt], f"--model {corrupt}", out),
        "truncated model": ([media.small, "-o", out, "--model", truncated], "truncated.stm", out),
        "output exists": ([media.small, "-o", existing, *ok], "already exists", None),
        "output folder missing": ([media.small, "-o", tmp / "no" / "out.mkv", *ok], "does not exist",
                                  tmp / "no" / "out.mkv"),
        "output folder is a file": ([media.small, "-o", a_file / "out.mkv", *ok], "", a_file / "out.mkv"),
        "output is a directory": ([media.small, "-o", folder, *ok, "--force"], "directory", None),
        "unknown container": ([media.small, "-o", tmp / "out.avi", *ok], "unsupported container",
                              tmp / "out.avi"),
        "ffv1 in mp4": ([media.small, "-o", tmp / "out.mp4", *ok, "--encoder", "ffv1"], "FFV1",
                        tmp / "out.mp4"),
        "unknown encoder": ([media.small, "-o", out, *ok, "--encoder", "vp9"], "--encoder", out),
        "crf out of range": ([media.small, "-o", out, *ok, "--crf", "99"], "--crf", out),
        "crf with ffv1": ([media.small, "-o", out, *ok, "--encoder", "ffv1", "--crf", "10"], "--crf", out),
        "unknown preset": ([media.small, "-o", out, *ok, "--preset", "warp"], "--preset", out),
        "unparsable ffmpeg args": ([media.small, "-o", out, *ok, "--ffmpeg-args", "-metadata 'x"],
                                   "--ffmpeg-args", out),
        "bad tilesize": ([media.small, "-o", out, *ok, "--tilesize", "big"], "--tilesize", out),
        "output is the input": ([media.small, "-o", media.small, *ok, "--force"], "is the input", None),
    }


def test_bad_inputs_fail_early_with_a_clear_message(media, tiny_bundle, tmp_path, capsys):
    before_small = media.small.read_bytes()
    for name, (args, needle, must_not_exist) in _bad_cases(media, tiny_bundle, tmp_path).items():
        rc, err = run(capsys, "upscale", *args)
        assert rc == 2, f"{name}: exit {rc}, {err}"
        assert err.startswith("selftransfer upscale: error: ") and err.count("\n") == 1, f"{name}: {err}"
        assert needle in err, f"{name}: {err!r} does not mention {needle!r}"
        if must_not_exist is not None:
            assert not must_not_exist.exists(), name
        assert leftovers(tmp_path) == [], name
    assert (tmp_path / "exists.mkv").read_bytes() == b"keep me"
    assert media.small.read_bytes() == before_small


def test_unwritable_output_folder(media, tiny_bundle, tmp_path, capsys):
    folders = []
    if os.geteuid() != 0:  # root writes anywhere the permission bits forbid
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        folders.append(locked)
    if Path("/proc/self").is_dir():  # nobody, not even root, creates files in /proc
        folders.append(Path("/proc"))
    if not folders:
        pytest.skip("no unwritable folder available on this system")
    try:
        for folder in folders:
            rc, err = run(capsys, "upscale", media.small, "-o", folder / "out.mkv", "--model", tiny_bundle)
            assert rc == 2 and "cannot write" in err, err
            assert not (folder / "out.mkv").exists()
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)


# -- kills ----------------------------------------------------------------------------------------------------

SLOW_UPSCALE = textwrap.dedent("""\
    import sys
    sys.path.insert(0, {tests!r})
    from vs_selftransfer.pipeline import upscale as up
    from test_upscale import resize_script
    up.build_script = lambda *a, **k: resize_script(*a, **k, sleep=0.5)
    up.preflight = lambda *a, **k: None
    from selftransfer_trainer.cli import main
    sys.exit(main(sys.argv[1:]))
    """)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its (new) parent has not reaped it yet


def _default_termination_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _start_slow_upscale(media, bundle, out: Path):
    """A real ``selftransfer upscale`` process, slowed to 0.5 s a frame, once frames flow through the pipeline.
    Returns the process, its children (vspipe, ffmpeg) and the list its stderr lines are collected in."""
    import threading

    code = SLOW_UPSCALE.format(tests=str(Path(__file__).parent))
    # The child gets SIGINT and SIGTERM at their default disposition, as an interactive shell would start it: a suite
    # run as a background job (`nohup pytest ... &`) inherits SIGINT ignored, and Python then never turns it into
    # KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-c", code, "upscale", str(media.small), "-o", str(out), "--model",
                             str(bundle)], stderr=subprocess.PIPE, text=True, preexec_fn=_default_termination_signals)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 120
    while not (any(f"frames 2/{FRAMES}" in line for line in err) and len(_children(proc.pid)) == 2):
        assert proc.poll() is None, "".join(err)
        assert time.monotonic() < deadline, "the pipeline did not start"
        time.sleep(0.05)
    children = _children(proc.pid)
    assert any(_writes_in(child, out.parent) for child in children), "ffmpeg writes no file in OUT's folder"
    return proc, children, err


def _writes_in(pid: int, folder: Path) -> bool:
    """Whether the process has a file in ``folder`` open (ffmpeg's partial file, named or not)."""
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            pass
    return any(os.path.dirname(link) == str(folder) for link in links)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_sigkill_leaves_no_output_and_no_orphans(media, tiny_bundle, tmp_path, capsys, plumbing):
    out = tmp_path / "out.mkv"
    proc, children, _ = _start_slow_upscale(media, tiny_bundle, out)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(c) for c in children), "vspipe/ffmpeg outlived a SIGKILLed selftransfer"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial file had no name: it went with the process
    scratch = list(Path(tempfile.gettempdir()).glob(f"{up.SCRATCH_PREFIX}{proc.pid}-*"))
    assert scratch  # the killed run's temp folder (its .vpy)...
    rc, err = run(capsys, "upscale", media.small, "-o", out, "--model", tiny_bundle)
    assert rc == 0, err
    assert leftovers(tmp_path) == [] and int(streams_of(out)[0]["nb_read_packets"]) == FRAMES
    assert not any(p.exists() for p in scratch)  # ...is cleaned up by the next run


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_everything_and_remove_the_partial_file(media, tiny_bundle, tmp_path, sig):
    out = tmp_path / "out.mkv"
    proc, children, err = _start_slow_upscale(media, tiny_bundle, out)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    assert rc == 128 + sig, "".join(err)
    assert not any(_alive(c) for c in children)
    assert not out.exists() and leftovers(tmp_path) == []


# -- units ----------------------------------------------------------------------------------------------------

def test_vspipe_progress_parsing_across_chunk_boundaries():
    stream = SimpleNamespace(write=lambda s: None, flush=lambda: None, isatty=lambda: False)
    lines = []
    stream.write = lines.append
    progress = prog.Progress(total=None, stream=stream)
    tail = collections.deque(maxlen=10)
    chunks = ["Information: VideoSource track #0 index pro", "gress 40%\nScript evaluation done in 0.1 seconds\n",
              "Frame: 1/12\rFra", "me: 5/12\r", "Output 12 frames in 1.00 seconds (12.00 fps)\nError: boom\n"]
    prog.parse_vspipe_stderr(iter(chunks), progress, tail)
    assert (progress.done, progress.total) == (12, 12)
    assert list(tail) == ["Script evaluation done in 0.1 seconds", "Error: boom"]
    assert any("frames 12/12 (100%)" in line for line in lines)


def test_blame_goes_to_the_process_that_failed_by_itself():
    def proc(code, pid):
        return SimpleNamespace(returncode=code, pid=pid)

    vs_tail, ff_tail = ["vspipe says"], ["ffmpeg says"]
    with pytest.raises(process.PipelineError, match="ffmpeg failed"):  # ffmpeg died; vspipe then got SIGPIPE
        process._raise_on_failure(proc(-signal.SIGPIPE, 1), proc(1, 2), vs_tail, ff_tail, set())
    broken = ["Error: fwrite() call failed when writing video plane 0, errno: 32, frame: 3"]
    with pytest.raises(process.PipelineError, match="ffmpeg failed"):  # the same with SIGPIPE ignored
        process._raise_on_failure(proc(1, 1), proc(1, 2), broken, ff_tail, set())
    with pytest.raises(process.PipelineError, match="vspipe failed"):  # the script failed; ffmpeg saw no input
        process._raise_on_failure(proc(1, 1), proc(1, 2), vs_tail, ff_tail, set())
    with pytest.raises(process.PipelineError, match="vspipe failed.*\n.*vspipe says"):  # we killed ffmpeg after
        process._raise_on_failure(proc(1, 1), proc(-9, 2), vs_tail, ff_tail, {2})
    with pytest.raises(process.PipelineError, match="ffmpeg failed"):  # ffmpeg failed, we killed vspipe after
        process._raise_on_failure(proc(-9, 1), proc(1, 2), vs_tail, ff_tail, {1})
    process._raise_on_failure(proc(0, 1), proc(0, 2), vs_tail, ff_tail, set())


def test_ffmpeg_command_and_colour_tags(tmp_path):
    streams = mux.SourceStreams(video={"index": 1, "start_time": "0.250", "tags": {"language": "jpn"}},
                               audio=[{"index": 0}], subtitles=[], attachments=[], start_time=0.0)
    plan = mux.StreamPlan(maps=["-map", "0:0"], codec_args=[], warnings=[])
    cmd = mux.build_ffmpeg_command("ffmpeg", Path("in.mp4"), Path(".out.mkv.partial.mkv"), muxer="matroska",
                                  video_args=["-c:v", "libx264"], streams=streams, plan=plan, extra=["-g", "48"])
    joined = " ".join(cmd)
    assert "-itsoffset 0.250000 -f yuv4mpegpipe -i pipe:0 -i in.mp4 -map 0:v:0 -map 1:0" in joined
    assert "-map_metadata 1 -map_chapters 1" in joined and "-metadata:s:v:0 language=jpn" in joined
    assert cmd[-4:] == ["-f", "matroska", "-y", ".out.mkv.partial.mkv"]  # the muxer never comes from the name
    assert joined.index("-c:v libx264") < joined.index("-g 48")  # user options come after ours and win
    sd_untagged = {"width": 640, "height": 360}
    assert mux.color_args(sd_untagged, 1280, 720) == ["-colorspace", "smpte170m"]
    assert mux.color_args(sd_untagged, 960, 540) == []
    assert mux.color_args({"width": 640, "height": 360, "color_space": "bt709", "color_range": "tv"}, 1280, 720) \
        == ["-color_range", "tv", "-colorspace", "bt709"]
