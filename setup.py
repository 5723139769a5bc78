"""Build of qgrad: the pure-Python package, plus the compiled extension ``qgrad._C`` when it can be built.

Project metadata lives in pyproject.toml; this file adds what a declarative config cannot express:

* ``qgrad._C`` from ``csrc/``: a ``CppExtension`` (OpenMP CPU kernels) on a CPU-only torch, a
  ``CUDAExtension`` (CPU kernels plus ``csrc/cuda/*.cu``) when torch was built with CUDA and a CUDA toolkit
  is found. The extension must be compiled against the torch that will import it, hence
  ``pip install --no-build-isolation .``; a plain ``pip install .`` builds in an isolated environment
  without torch and yields the pure-Python package.
* the top-level ``kernels/`` folder (Triton kernels), installed as the package ``qgrad.kernels``.

Environment variables:

* ``QGRAD_BUILD_EXT``: unset (or ``auto``) builds the extension when torch is importable and falls back to
  the pure-Python package, with one message, when it is not or when compiling fails; ``0`` never builds it;
  ``1`` requires it and fails the install otherwise.
* ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``) and ``MAX_JOBS`` are read by ``torch.utils.cpp_extension``:
  the GPU architectures to compile for and the number of parallel compiler jobs (ninja builds the files in
  parallel, one op per file).
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("QGRAD_BUILD_EXT", "auto").strip().lower()
REQUIRE_EXT = BUILD_EXT == "1"
_STRICT = "" if REQUIRE_EXT else "; set QGRAD_BUILD_EXT=1 to make a failed build an error"
HOW_TO_BUILD = (
    "to build it, install torch first and then run `pip install --no-build-isolation .` "
    f"(add -e for an editable install{_STRICT})"
)
# setup.py also runs for metadata-only commands (egg_info, dist_info); only builds print the note.
_BUILD_COMMANDS = ("build", "build_ext", "build_py", "bdist_wheel", "editable_wheel", "install", "develop")
_BUILDING = any(cmd in sys.argv for cmd in _BUILD_COMMANDS)


def _note(message):
    if _BUILDING:
        print(f"qgrad: {message}", file=sys.stderr)


def _packages():
    packages = find_packages(where=ROOT, include=["qgrad", "qgrad.*"])
    package_dir = {}
    if os.path.isdir(os.path.join(ROOT, "kernels")):
        package_dir["qgrad.kernels"] = "kernels"
        subpackages = find_packages(where=os.path.join(ROOT, "kernels"))
        packages += ["qgrad.kernels"] + ["qgrad.kernels." + p for p in subpackages]
    return packages, package_dir


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _toolkit_version(cuda_home):
    """``"major.minor"`` of the nvcc under ``cuda_home``, or None without a working nvcc."""
    if not cuda_home:
        return None
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _extension():
    """Return (ext_modules, cmdclass); empty when the extension is skipped."""
    if BUILD_EXT == "0":
        _note(
            "QGRAD_BUILD_EXT=0: skipping the compiled extension qgrad._C; installing the pure-Python package"
        )
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if REQUIRE_EXT:
            raise RuntimeError(
                f"QGRAD_BUILD_EXT=1 but torch is not importable here ({exc}); {HOW_TO_BUILD}"
            ) from exc
        _note(
            "torch is not importable in this build environment (pip's build isolation hides it), so the "
            "compiled extension qgrad._C was skipped and the pure-Python package is installed; "
            f"{HOW_TO_BUILD}"
        )
        return [], {}

    sources = _sources("csrc/binding.cpp") + _sources("csrc/cpu/*.cpp")
    # -fno-trapping-math lets GCC if-convert the kernels' selects and so vectorize their loops (checked with
    # -fopt-info-vec: without it no hot loop vectorizes). It only drops the guarantee about floating-point
    # exception flags; rounding stays IEEE round-to-nearest and nothing is reassociated. No -ffast-math: the
    # kernels must reproduce the IEEE division and rounding of the reference bit for bit.
    # -fno-wrapv undoes the -fwrapv that extension builds inherit from Python's own compiler flags: with
    # wrapping signed arithmetic GCC cannot bound the trip count of a loop such as
    # `for (; i + 16 <= end; i += 16)` and vectorized the l1 kernel's sum into a gather loop, 10x slower
    # (measured on a 131k-element float32 tensor in cache). The kernels never rely on signed overflow.
    unix = ["-O3", "-fno-trapping-math", "-fno-wrapv"]
    if sys.platform == "win32":
        cxx, link = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":
        # Apple clang has no -fopenmp; at::parallel_for then runs on one thread in these kernels.
        cxx, link = unix, []
    else:
        # -fopenmp makes at::parallel_for an OpenMP loop; libgomp resolves to the copy torch already loaded.
        cxx, link = unix + ["-fopenmp"], ["-fopenmp"]
    cuda = False
    if torch.version.cuda:
        major = torch.version.cuda.split(".")[0]
        toolkit = _toolkit_version(cpp_extension.CUDA_HOME)
        # torch refuses to compile with a toolkit of another major version than its own
        cuda = toolkit is not None and toolkit.split(".")[0] == major
        if not cuda:
            found = (
                "no CUDA toolkit (nvcc) was found" if toolkit is None else f"the CUDA toolkit is {toolkit}"
            )
            _note(
                f"torch was built with CUDA {torch.version.cuda} but {found}; building qgrad._C with the CPU "
                f"kernels only (set CUDA_HOME to a CUDA {major}.x toolkit to build the CUDA kernels)"
            )
    if cuda:
        ext = cpp_extension.CUDAExtension(
            "qgrad._C",
            sources + _sources("csrc/cuda/*.cu"),
            define_macros=[("QGRAD_WITH_CUDA", None)],
            # No --use_fast_math: its approximate division and flush-to-zero would change the results.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "qgrad._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )

    class BuildExt(cpp_extension.BuildExtension):
        """Turns a failed opportunistic build into the pure-Python package plus one message."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, compile or link error, ninja failure
                if REQUIRE_EXT:
                    raise
                self.extensions = []
                self.distribution.ext_modules = []
                _note(
                    f"building the compiled extension qgrad._C failed ({type(exc).__name__}: {exc}); "
                    "installing the pure-Python package instead. Fix the compiler error above, or set "
                    "QGRAD_BUILD_EXT=0 to skip the build on purpose"
                )

    return [ext], {"build_ext": BuildExt}


packages, package_dir = _packages()
ext_modules, cmdclass = _extension()
setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
