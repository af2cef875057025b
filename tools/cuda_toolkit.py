"""Where the CUDA toolkit is, for setup.py, the emulated GPU's build and
`make cuda-check` (no torch import: setup.py needs the answer before
torch.utils.cpp_extension reads CUDA_HOME).

torch guesses CUDA_HOME as the directory above the `bin/` holding the first
`nvcc` on PATH. When that nvcc is a wrapper outside the toolkit (a
`/usr/local/bin/nvcc` shell script exec'ing `/usr/local/cuda-13.0/bin/nvcc`,
as on our machines and in many containers) the guess is `/usr/local` and
`cuda_runtime.h` is not found. nvcc itself knows its toolkit: `--dryrun`
prints `TOP=<toolkit>/bin/..`.

    python tools/cuda_toolkit.py          # prints the toolkit root, or exits 1
"""
import os
import re
import shutil
import subprocess
import sys


def is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def toolkit_of_nvcc(nvcc):
    """The toolkit an nvcc executable belongs to (it may be a wrapper script)."""
    real = os.path.realpath(nvcc)
    beside = os.path.dirname(os.path.dirname(real))
    if is_toolkit(beside):
        return beside
    try:
        # --dryrun compiles nothing; an empty input name is enough for nvcc to
        # print its environment lines.
        proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
    if match:
        top = os.path.realpath(match.group(1).strip())
        if is_toolkit(top):
            return top
    return None


def find_cuda_home(environ=None):
    """The toolkit root: CUDA_HOME / CUDA_PATH when they hold a toolkit, else
    the toolkit of the nvcc on PATH, else /usr/local/cuda; None if none is."""
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(environ.get(var)):
            return environ[var]
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc:
        root = toolkit_of_nvcc(nvcc)
        if root:
            return root
    return "/usr/local/cuda" if is_toolkit("/usr/local/cuda") else None


if __name__ == "__main__":
    home = find_cuda_home()
    if home is None:
        print("no CUDA toolkit found (set CUDA_HOME)", file=sys.stderr)
        sys.exit(1)
    print(home)
