"""DIN installs as one top-level package, ``din``: the checkout's ``shared/``, ``services/``, ``zoo/`` and ``bench/``
folders are its subpackages ``din.shared``, ``din.services``, ``din.zoo`` and ``din.bench`` (everything else is in
``pyproject.toml``)."""

from setuptools import find_packages, setup

FOLDERS = ("shared", "services", "zoo", "bench")
"""Top-level folders of the checkout installed under ``din``."""

packages = find_packages(include=["din", "din.*"])
for folder in FOLDERS:
    packages += [f"din.{name}" for name in find_packages(include=[folder, f"{folder}.*"])]

setup(packages=packages, package_dir={"din": "din", **{f"din.{folder}": folder for folder in FOLDERS}})
