import shutil

import pytest

from safemerge_ray.synthetic import SynthSpec, build_fixture

ARCHS = ("llama", "qwen2")


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fixtures")


def _fixture(root, key, spec, **kw):
    path = root / key
    if not path.exists():
        build_fixture(path, spec, **kw)
    return path


@pytest.fixture(scope="session", params=ARCHS)
def pair(request, fixtures_root):
    """A tiny model pair (Llama-style, and Qwen2-style with q/k/v biases) with a safety adapter and one fine-tune."""
    spec = SynthSpec(arch=request.param, hidden=32, layers=2, heads=4, rank=4, seed=3)
    return _fixture(fixtures_root, f"pair-{request.param}", spec)


@pytest.fixture
def pristine(fixtures_root, tmp_path):
    """A private copy of a Llama fixture that a test may damage."""
    src = _fixture(fixtures_root, "pristine", SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=5))
    dst = tmp_path / "fx"
    shutil.copytree(src, dst)
    return dst
