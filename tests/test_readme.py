"""The README's Python example, run as written: a new user pastes it first."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs_and_trains_a_quantization_robust_model(capsys):
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Using it from Python\n\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its '## Using it from Python' example"
    namespace = {"__name__": "readme_example"}
    exec(compile(match.group(1), str(README), "exec"), namespace)

    rows = {(r["weight_bits"], r["act_bits"]): r for r in namespace["rows"]}
    assert rows[(None, None)]["accuracy"] >= 95.0  # digits, 10 plain + 3 penalized epochs
    assert rows[(4, 4)]["accuracy"] >= 90.0
    assert "| W bits | A bits |" in capsys.readouterr().out
    # penalty.remove() gave the model its torch modules back
    model = namespace["model"]
    assert not any(type(m).__module__.startswith("qgrad.nn") for m in model.modules())
    assert isinstance(namespace["qmodel"], torch.nn.Module)
