"""The plugin never runs its own code after VapourSynth unloads it, whatever the runtime keeps of a frame.

VapourSynth unloads plugins when its core is freed; Python frees what the runtime kept (an array into a frame, a
reference cycle through a traceback) later, during its own shutdown. Each case runs a real ``vspipe`` on a script
that patches ``vs_selftransfer.runtime`` (the module the plugin imports) to keep a plane in one way, and checks how
the process ends: cleanly (rc 0), or with the frame's error (rc 1) — never killed by a signal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import vapoursynth as vs

from conftest import ROOT
from test_plugin import ensure_plugin

VSPIPE = Path(sys.executable).with_name("vspipe")
KEPT = "the runtime kept a reference to frame memory after returning"

SCRIPT = '''
import gc
import numpy as np
import vapoursynth as vs
import vs_selftransfer.runtime as runtime

core = vs.core
if not hasattr(core, "selftransfer"):
    core.std.LoadPlugin(plugin)

# Automatic collection off: garbage in a cycle then lives until a later collection, which vspipe runs after the
# core (and with it the plugin) is gone, unless the plugin collects it first.
gc.disable()
# What the runtime keeps sits in a cycle too: the script's globals are cleared before the core is freed, so only
# a collection after the plugin is unloaded frees it (what a long-lived runtime object would do at shutdown).
kept = []
kept.append(kept)
real = runtime.tiled_upscale


class Holder:
    pass


def keep_array(run, src, dst, *args, **kwargs):
    kept.append(np.asarray(dst[0]))  # an array into the output frame, alive after the call
    return real(run, src, dst, *args, **kwargs)


def keep_source_slice(run, src, dst, *args, **kwargs):
    kept.append(np.asarray(src[1])[2:5, 1:])  # a slice of an array into the source frame
    return real(run, src, dst, *args, **kwargs)


real_process = runtime.Upscaler.process


def keep_view(self, slot, n, src_planes, dst_planes):
    kept.append((src_planes, dst_planes))  # the plugin's own memoryviews: released after the call, harmless
    return real_process(self, slot, n, src_planes, dst_planes)


def cycle(run, src, dst, *args, **kwargs):
    holder = Holder()
    holder.itself, holder.plane = holder, np.asarray(dst[2])  # garbage, but only a collection frees it
    return real(run, src, dst, *args, **kwargs)


def traceback_cycle(run, src, dst, *args, **kwargs):
    plane = np.asarray(src[0])  # a local of the failing frame, which the traceback holds
    try:
        raise RuntimeError("injected failure with a traceback cycle")
    except RuntimeError as e:
        error = e  # exception -> traceback -> this frame -> error: a cycle
    raise error


if mode == "keep_view":
    runtime.Upscaler.process = keep_view
else:
    runtime.tiled_upscale = globals()[mode]
blank = core.std.BlankClip(format=vs.RGBS, width=32, height=24, length=3, color=[0.2, 0.5, 0.8])
clip = core.selftransfer.Upscale(core.resize.Point(blank, format=vs.YUV420P8, matrix_s="709"), model=model,
                                 backend="ort")
clip.set_output()
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lifetime") / "keep.vpy"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def plugin_path() -> str:
    return ensure_plugin(vs.core)


def run_vspipe(script: Path, plugin: str, model: Path, mode: str) -> subprocess.CompletedProcess:
    if not VSPIPE.exists():
        pytest.skip(f"vspipe not found next to {sys.executable}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [str(VSPIPE), "-a", f"plugin={plugin}", "-a", f"model={model}", "-a", f"mode={mode}", str(script), "--"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def describe(done: subprocess.CompletedProcess) -> str:
    # .venv/bin/vspipe is a Python launcher: a crash of the vspipe it runs shows as 256 - signal (245: SIGSEGV).
    code = done.returncode
    signum = -code if code < 0 else 256 - code if code > 128 else 0
    how = f"rc {code}" + (f" ({signal.Signals(signum).name}?)" if signum in signal.valid_signals() else "")
    return f"vspipe {how}; stderr:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("mode", ["keep_array", "keep_source_slice"])
def test_a_kept_array_fails_the_frame_and_the_process_exits_cleanly(script, plugin_path, tiny_bundle, mode):
    done = run_vspipe(script, plugin_path, tiny_bundle, mode)
    assert done.returncode == 1, describe(done)
    assert f"selftransfer.Upscale: {KEPT}" in done.stderr, describe(done)


def test_kept_plane_objects_are_released_not_fatal(script, plugin_path, tiny_bundle):
    done = run_vspipe(script, plugin_path, tiny_bundle, "keep_view")
    assert done.returncode == 0, describe(done)


def test_a_reference_cycle_holding_a_plane_is_collected(script, plugin_path, tiny_bundle):
    done = run_vspipe(script, plugin_path, tiny_bundle, "cycle")
    assert done.returncode == 0, describe(done)


def test_a_traceback_cycle_holding_a_plane_gives_the_frame_error(script, plugin_path, tiny_bundle):
    done = run_vspipe(script, plugin_path, tiny_bundle, "traceback_cycle")
    assert done.returncode == 1, describe(done)
    assert "selftransfer.Upscale: RuntimeError: injected failure with a traceback cycle" in done.stderr
    assert KEPT not in done.stderr, describe(done)  # the collection freed it: nothing leaked
