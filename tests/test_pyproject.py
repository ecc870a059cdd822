"""pyproject's dependency floors are at least the versions whose APIs the code calls (an older install would
fail at run time, not at pip time)."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


def floors(requirements: list[str]) -> dict[str, Version]:
    out = {}
    for line in requirements:
        req = Requirement(line)
        out[req.name] = min((Version(s.version) for s in req.specifier if s.operator == ">="), default=Version("0"))
    return out


@pytest.mark.parametrize(
    "package, needed, why",
    [
        ("torch", "2.4", "CPU fused=True Adam/AdamW/SGD in heads.py; torch.amp.GradScaler(device) needs 2.3"),
        ("torchvision", "0.19", "v2.GaussianNoise in augment.py"),
        ("joblib", "1.3", "Parallel(return_as='generator') in data.py"),
    ],
)
def test_dependency_floors_cover_the_apis_used(package, needed, why):
    assert floors(PROJECT["dependencies"])[package] >= Version(needed), why


def test_the_test_extra_installs_timm_at_the_timm_extras_floor():
    extras = PROJECT["optional-dependencies"]
    assert floors(extras["test"])["timm"] == floors(extras["timm"])["timm"] >= Version("1.0.9")


def test_the_test_extra_installs_torchao_at_the_int8_extras_floor():
    """CI installs '.[test]': the int8 tests run there, not skipped."""
    extras = PROJECT["optional-dependencies"]
    assert floors(extras["test"])["torchao"] == floors(extras["int8"])["torchao"]
