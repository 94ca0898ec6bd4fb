"""What pyproject.toml cannot say: the repository's top-level ``bench/`` folder installs as
``wqs.bench``, so ``wqs`` is the only top-level name in site-packages. Everything else
about the package is in pyproject.toml.

In the repository ``python -m bench.compare`` runs the benchmarks; after ``pip install``
it is ``python -m wqs.bench.compare`` (bench's own imports are relative, so both work).
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["wqs", "wqs.*"]) + ["wqs.bench"],
    package_dir={"wqs.bench": "bench"},
)
