"""notebooks/quickstart.ipynb runs top to bottom on the CPU with the tiny preset.

The notebook is executed in memory by ``nbclient`` on a kernel of this very
interpreter, with its parameters cell replaced; the committed file is never
written. A cell error fails the test with that cell's traceback.
"""

import json
import pathlib
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
KERNEL = "mtl-test-python"


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return cells[0]


def execute(nb, jupyter_path: pathlib.Path, **params):
    """Runs ``nb`` in place, its parameters cell replaced by ``params``.

    ``jupyter_path`` must be on ``JUPYTER_PATH``: a kernel spec naming this
    interpreter goes there, so the kernel sees the packages the tests see.
    """
    parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    spec = jupyter_path / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=600,
        # The kernel starts in notebooks/, so the notebook finds its checkout and installs nothing.
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    return nb


def test_committed_notebook_has_parameters_and_clean_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = parameters_cell(nb).source
    assert "PRESET" in source and "STEPS" in source
    text = NOTEBOOK.read_text()
    for fragment in ("/work/", "/tmp/", "/home/", str(ROOT)):
        assert fragment not in text, f"the committed notebook mentions the machine-specific {fragment!r}"
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the committed notebook shows no plot; execute it and save its outputs"


@pytest.mark.slow
def test_notebook_runs_with_the_tiny_preset(tmp_path, monkeypatch):
    # One CPU device: the conftest's 8 virtual devices only slow a tiny run down on a small machine.
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    before = NOTEBOOK.read_bytes()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    out = tmp_path / "run"
    params = {"PRESET": "tiny", "STEPS": 30, "EVAL_EVERY": 10, "TASKS": "g2p,langid,valence,hyphenate"}
    execute(nb, tmp_path / "jupyter", **params, OUT=str(out))

    assert NOTEBOOK.read_bytes() == before, "executing the notebook must not modify the committed file"
    assert (out / "metrics.jsonl").is_file() and (out / "metrics.png").is_file()
    assert any((out / "tensorboard").iterdir()), "trainer.run should write TensorBoard scalars beside metrics.jsonl"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot cell shows no image"
    tables = [o["data"]["text/plain"] for o in outputs if "text/html" in o.get("data", {})]
    served = [t for t in tables if "hyph-1" in t]
    assert served, "the serving cell shows no table of answers"
    assert "unknown task 'poetry'" in served[0], "a bad request should be answered with its error"
    pretrained = [t for t in tables if "pre-lang-1" in t]
    assert pretrained and "pre-g2p-1" in pretrained[0], "the pretrained section serves both tasks in one batch"
    assert (out.parent / "run-pretrained" / "tokenizer.json").is_file(), "--init keeps the model's tokenizer"


def test_the_notebook_extra_installs_what_the_notebook_imports():
    """Every module a code cell imports comes from the standard library, mtl, its dependencies or `notebook`."""
    import importlib.metadata
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["notebook"]
    names = {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in wanted}
    providers = importlib.metadata.packages_distributions()
    ours = {"mtl", "sharding", "tasks"}
    imported = set()
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] == "code":
            found = re.finditer(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", "".join(cell["source"]), re.M)
            imported |= {(m.group(1) or m.group(2)).split(".")[0] for m in found}
    assert {"pandas", "torch", "IPython"} <= imported  # the check reads the cells
    missing = [
        module
        for module in sorted(imported - ours - set(sys.stdlib_module_names))
        if not {d.lower().replace("_", "-") for d in providers.get(module, [])} & names
    ]
    assert not missing, f"the notebook imports {missing}, which pyproject's notebook extra does not install"
