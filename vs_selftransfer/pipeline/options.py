"""The options ``selftransfer script`` and ``selftransfer upscale`` share: the filter's arguments
(core.selftransfer.Upscale) and the encoder's, their command-line definitions and their validation."""
from __future__ import annotations

import dataclasses
import re
import shlex

from vs_selftransfer import runtime
from vs_selftransfer.backend_base import parse_device
from vs_selftransfer.errors import UserError

BACKENDS = ("auto", *runtime.BACKENDS)
PRECISIONS = ("auto", *runtime.PRECISIONS)
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
# encoder -> (ffmpeg encoder name, default crf (None: lossless, no crf/preset), crf range)
ENCODERS = {
    "x264": ("libx264", 18, (0, 51)),
    "x265": ("libx265", 20, (0, 51)),
    "ffv1": ("ffv1", None, None),
}


@dataclasses.dataclass(frozen=True)
class FilterOptions:
    """Arguments for core.selftransfer.Upscale; None leaves the plugin's default. The plugin's runtime validates
    them all again at script evaluation; checking here too fails before any decoding starts."""
    backend: str | None = None
    device: str | None = None
    tilesize: tuple[int, ...] | None = None  # (size,) or (width, height), input pixels; 0 = no tiling that way
    overlap: int | None = None
    num_streams: int | None = None
    threads: int | None = None
    precision: str | None = None
    reuse: int | None = None  # 1: exact temporal reuse (the plugin's default), 0: run every tile

    @classmethod
    def from_args(cls, args) -> "FilterOptions":
        opts = cls(backend=args.backend, device=args.device, tilesize=_parse_tilesize(args.tilesize),
                   overlap=args.overlap, num_streams=args.num_streams, threads=args.threads,
                   precision=args.precision, reuse=args.reuse)
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.device is not None:
            try:
                parse_device(self.device)
            except ValueError as e:
                raise UserError(f"--device: {e}") from None
        if self.overlap is not None and self.overlap < 0:
            raise UserError(f"--overlap must be 0 or more pixels, not {self.overlap}")
        if self.num_streams is not None and self.num_streams < 1:
            raise UserError(f"--num-streams must be at least 1, not {self.num_streams}")
        if self.threads is not None and self.threads < 0:
            raise UserError(f"--threads must be 0 (automatic) or more, not {self.threads}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.reuse is not None and self.reuse not in (0, 1):
            raise UserError(f"--reuse must be 0 or 1, not {self.reuse}")

    def plugin_kwargs(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = (value[0] if len(value) == 1 else list(value)) if f.name == "tilesize" else value
        return out

    def call_args(self) -> str:
        """The given options as Python keyword arguments after ``model=...`` in a script: ``, backend='ort'``."""
        return "".join(f", {name}={value!r}" for name, value in self.plugin_kwargs().items())


def _parse_tilesize(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise UserError(f"--tilesize must be N or WxH in input pixels (0: no tiling), not {text!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


def add_filter_arguments(p) -> None:
    g = p.add_argument_group("filter options (core.selftransfer.Upscale; unset ones use the plugin's defaults)")
    g.add_argument("--backend", choices=BACKENDS, help="inference backend (auto: fastest installed for the device)")
    g.add_argument("--device", help="cpu (default), cuda[:N] (NVIDIA) or gpu[:N] (Intel, OpenVINO)")
    g.add_argument("--tilesize", metavar="N|WxH", help="tile size in input pixels (0: no tiling)")
    g.add_argument("--overlap", type=int, help="context pixels around each tile")
    g.add_argument("--num-streams", type=int, help="frames processed in parallel")
    g.add_argument("--threads", type=int, help="CPU threads per stream (0: automatic)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="inference precision (auto: a per-video int8/bf16 graph fit accepted for this CPU, else fp32)")
    g.add_argument("--reuse", type=int, choices=(0, 1),
                   help="exact temporal reuse of tiles identical to the previous frame's (1, default; lossless), "
                        "0: run every tile")


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    encoder: str
    crf: int | None
    preset: str | None
    extra: list[str]

    @classmethod
    def from_args(cls, args) -> "EncodeOptions":
        if args.encoder not in ENCODERS:
            raise UserError(f"--encoder must be one of {', '.join(ENCODERS)}, not {args.encoder!r}")
        _, default_crf, crf_range = ENCODERS[args.encoder]
        if default_crf is None and (args.crf is not None or args.preset is not None):
            raise UserError(f"--crf and --preset do not apply to --encoder {args.encoder} (lossless)")
        if args.crf is not None and not crf_range[0] <= args.crf <= crf_range[1]:
            raise UserError(f"--crf must be in {crf_range[0]}..{crf_range[1]} for {args.encoder}, not {args.crf}")
        if args.preset is not None and args.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESETS)}, not {args.preset!r}")
        try:
            extra = shlex.split(args.ffmpeg_args or "")
        except ValueError as e:
            raise UserError(f"--ffmpeg-args cannot be parsed: {e}") from None
        return cls(args.encoder, args.crf, args.preset, extra)


def add_encode_arguments(p) -> None:
    p.add_argument("--encoder", default="x264", help=f"video encoder: {', '.join(ENCODERS)} (default: %(default)s)")
    p.add_argument("--crf", type=int, help="x264/x265 quality (lower is better; default 18 for x264, 20 for x265)")
    p.add_argument("--preset", help="x264/x265 speed preset (default: medium)")
    p.add_argument("--ffmpeg-args", default="",
                   help="extra ffmpeg output options, shell-quoted, added after the encoder's (e.g. \"-pix_fmt "
                        "yuv420p -b:a 128k\")")
