"""The README's main Python example runs as written, as a script in a fresh folder (no exec/eval)."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_readme_python_example_runs(tmp_path):
    block = re.search(r"## Python example\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    script = tmp_path / "readme_example.py"
    script.write_text(block)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": path}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([2, 8, 64, 64])" in result.stdout
