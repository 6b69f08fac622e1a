# The flat layout keeps Triton kernels in the top-level ``kernels/`` folder (``kernels`` is taken on PyPI), so they
# are installed as ``mtflow.kernels``; likewise ``configs/`` as ``mtflow.configs`` (so the default config ships
# in a wheel). pyproject's ``packages.find`` cannot add a remapped package, hence this shim.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mtflow*"]) + ["mtflow.kernels", "mtflow.configs"],
    package_dir={"mtflow.kernels": "kernels", "mtflow.configs": "configs"},
)
