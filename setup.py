# The flat layout keeps Triton kernels in the top-level ``kernels/`` folder (``kernels`` is taken on PyPI, and by the
# Hugging Face distribution transformers imports), so they are installed as ``mtflow.kernels``: the package itself
# is ``mtflow/kernels/__init__.py`` and ``build_py`` adds ``kernels/*.py`` to it. ``kernels/`` has no
# ``__init__.py`` on purpose (see ``mtflow/kernels/__init__.py``). ``configs/`` ships as ``mtflow.configs`` (so the
# default config is in a wheel). pyproject's ``packages.find`` cannot add a remapped package, hence this shim.
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithKernels(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "mtflow.kernels":
            modules += [(package, path.stem, str(path)) for path in sorted(Path("kernels").glob("*.py"))]
        return modules


setup(
    packages=find_packages(include=["mtflow*"]) + ["mtflow.configs"],
    package_dir={"mtflow.configs": "configs"},
    cmdclass={"build_py": BuildWithKernels},
)
