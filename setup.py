"""Builds and installs selftransfer: the trainer, the runtime, and the native VapourSynth plugin.

The plugin is a plain shared library, ``libselftransfer.so``, installed with a ``manifest.vs`` into
``site-packages/vapoursynth/plugins/selftransfer/`` so VapourSynth autoloads it (the layout of the
``vapoursynth-*`` plugin wheels). An in-place build (``pip install -e .`` or ``python setup.py build_ext -i``) puts
it in ``build/vsplugin/`` instead: point ``VAPOURSYNTH_EXTRA_PLUGIN_PATH`` there while developing. (Building it
in place under ``./vapoursynth/`` would shadow the real ``vapoursynth`` package from the source tree.)
"""
import os
import re
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PLUGIN = "vapoursynth.plugins.selftransfer.libselftransfer"
HERE = os.path.dirname(os.path.abspath(__file__))
DEV_PLUGIN_DIR = os.path.join("build", "vsplugin")


def read_version() -> str:
    """The one version number lives in vs_selftransfer/__init__.py; the plugin is compiled with it too."""
    with open(os.path.join(HERE, "vs_selftransfer", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "(\d+\.\d+\.\d+)"$', f.read(), re.M).group(1)


VERSION = read_version()


class BuildPlugin(build_ext):
    def get_ext_filename(self, fullname):
        # distutils asks with the dotted name or, from get_ext_fullpath, with its last part only.
        if fullname in (PLUGIN, PLUGIN.rpartition(".")[2]):  # no CPython ABI suffix: loaded as libselftransfer.so
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_ext_fullpath(self, fullname):
        if fullname == PLUGIN and self.inplace:
            return os.path.join(HERE, DEV_PLUGIN_DIR, "libselftransfer.so")
        return super().get_ext_fullpath(fullname)

    def _get_inplace_equivalent(self, build_py, ext):
        # setuptools builds into build/lib and then copies "in place": for the plugin that is build/vsplugin/.
        inplace_file, regular_file = super()._get_inplace_equivalent(build_py, ext)
        if ext.name == PLUGIN:
            inplace_file = self.get_ext_fullpath(PLUGIN) if self.inplace else inplace_file
        return inplace_file, regular_file

    def copy_extensions_to_source(self):
        self.mkpath(os.path.join(HERE, DEV_PLUGIN_DIR))
        super().copy_extensions_to_source()
        write_manifest(os.path.join(HERE, DEV_PLUGIN_DIR))

    def build_extensions(self):
        import vapoursynth  # the build requirement; its headers are the API we compile against

        for ext in self.extensions:
            ext.include_dirs.append(vapoursynth.get_include())
        super().build_extensions()
        for ext in self.extensions:
            write_manifest(os.path.dirname(self.get_ext_fullpath(ext.name)))

    def get_outputs(self):
        outs = super().get_outputs()
        return outs + [os.path.join(os.path.dirname(self.get_ext_fullpath(PLUGIN)), "manifest.vs")]


def write_manifest(plugin_dir: str) -> None:
    with open(os.path.join(plugin_dir, "manifest.vs"), "w") as f:
        f.write("[VapourSynth Manifest V1]\nlibselftransfer\n")


def plugin_extension() -> Extension:
    # The plugin calls into the Python runtime. Link libpython when it is shared so the library also loads in
    # hosts that did not export Python's symbols globally; a static interpreter exports them itself.
    libs, lib_dirs = [], []
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libs = [f"python{sysconfig.get_config_var('LDVERSION')}"]
        lib_dirs = [sysconfig.get_config_var("LIBDIR")]
    return Extension(
        PLUGIN,
        sources=["vs_selftransfer/plugin/selftransfer.c"],
        libraries=libs,
        library_dirs=lib_dirs,
        runtime_library_dirs=lib_dirs,
        define_macros=[("SELFTRANSFER_VERSION", f'"{VERSION}"'),
                       ("SELFTRANSFER_VERSION_MAJOR", VERSION.split(".")[0]),
                       ("SELFTRANSFER_VERSION_MINOR", VERSION.split(".")[1])],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=c11", "-pthread"],
        extra_link_args=["-pthread"],
        py_limited_api=False,
    )


setup(
    name="selftransfer",
    version=VERSION,
    description="Per-video super-resolution for VapourSynth: fine-tune CARN-M on a video's own keyframes",
    license="MIT",
    python_requires=">=3.12",
    # The trainer's source folder is trainer/; it installs as selftransfer_trainer (PyPI has an unrelated `trainer`).
    package_dir={"selftransfer_trainer": "trainer"},
    packages=["selftransfer_trainer", "selftransfer_trainer.evaluation", "vs_selftransfer", "vs_selftransfer.pipeline"],
    package_data={"vs_selftransfer": ["plugin/*.c", "official/*"]},
    ext_modules=[plugin_extension()],
    cmdclass={"build_ext": BuildPlugin},
    install_requires=[
        "vapoursynth>=74,<90",
        "torch>=2.4,<3",
        "numpy>=1.26,<3",
        "av>=13,<20",
        "h5py>=3.10,<4",
        "opencv-python-headless>=4.9,<6",
        "safetensors>=0.4,<1",
        "onnx>=1.16,<2",
        "onnxscript>=0.1",
        "onnxruntime>=1.18,<2",
        # The fastest CPU engine (bf16 and VNNI int8 where the CPU has them): part of the default install. Next to
        # vs-mlrt's own OpenVINO it runs in a worker process (see vs_selftransfer/backend_ov.py).
        "openvino>=2024.4",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        "scikit-video>=1.1.11",
        # VMAF (vmaf_v0.6.1) in every eval report; pure Python on PyTorch, its model embedded (runs offline).
        "vmaf-torch>=1.1,<2",
        "vapoursynth-bestsource>=11",
    ],
    extras_require={
        "openvino": [],  # OpenVINO is in install_requires; the extra stays a valid name for install commands
        "tensorrt": ["torch-tensorrt>=2.4"],
        "cluster": ["ray>=2.10,<3"],  # `selftransfer upscale --ray`; also gives `ray start` for the machines
        # vs-mlrt's plugins: tests/test_coexist.py runs the filter next to them in one VapourSynth, as users do.
        # ray: tests/test_cluster.py runs chunked upscales on a local Ray cluster.
        "test": ["pytest>=8", "hypothesis>=6.100", "vapoursynth-mlrt-ort>=15", "vapoursynth-mlrt-ov>=15",
                 "ray>=2.10,<3"],
        "bench": ["vapoursynth-mlrt-ort>=15", "vapoursynth-mlrt-ov>=15"],
    },
    entry_points={"console_scripts": ["selftransfer=selftransfer_trainer.cli:main"]},
)
