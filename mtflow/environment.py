"""The versions of the packages mtflow's behaviour depends on, for bug reports, CI logs and ``mtflow --version``.

CI resolves the newest releases on every run (as a new user's ``pip install`` does), so a break caused upstream is
diagnosed by comparing this table between a green and a red log."""

from __future__ import annotations

from importlib import metadata

KEY_PACKAGES = ("torch", "transformers", "diffusers", "peft", "lightning", "kernels", "jsonargparse", "pip")


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    """Installed version per distribution name ("not installed" when absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def version_table(names: tuple[str, ...] = KEY_PACKAGES) -> str:
    """One ``name  version`` line per package, aligned."""
    versions = package_versions(names)
    width = max(map(len, versions))
    return "\n".join(f"{name:<{width}}  {version}" for name, version in versions.items())


if __name__ == "__main__":  # python -m mtflow.environment
    print(version_table())
