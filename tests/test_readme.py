"""The README's tour runs as written, and its two commands are the ones CI runs."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_tour():
    assert len(_python_blocks()) >= 2


def test_readme_tour_runs_as_written_and_renders_a_face():
    namespace = {}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    image, grad_clip = namespace["image"], namespace["grad_clip"]
    assert image.shape == (2, 224, 224, 3)
    assert (image.max(axis=-1) > 0).mean() > 0.2, "the tour's face should cover a good part of the image"
    assert np.isfinite(grad_clip).all() and np.abs(grad_clip).max() > 0
    assert np.abs(namespace["grad_clip_outline"]).max() > 0, "antialias should give the outline a gradient"
    assert namespace["code"].shape == (8, 257)


def test_ci_runs_the_readme_commands():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install ".[test]"' in commands and 'pip install -q ".[test]"' in ci
    assert "python -m fastface demo" in commands and "-m fastface demo" in ci
    assert "python -m pytest" in commands and "-m pytest" in ci
