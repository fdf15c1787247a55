"""Registration of HSTU with Transformers4Rec / Hugging Face, whatever the import order (merlin_hstu/__init__.py).

Import order is process state, so every case runs in a fresh interpreter (`sys.executable -c`).  Importing T4R
costs several seconds, so each subprocess walks one import order through as many steps as stay independent:
reloads, re-imports, registering again, building and running a model through the registry names.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Shared by every subprocess.  Defines checks only; imports nothing beyond the standard library.
PRELUDE = '''
import importlib
import os
import sys

MARK = "merlin_hstu_registers_after_import"


def hook_count():
    return sum(bool(getattr(finder, MARK, False)) for finder in sys.meta_path)


def t4r_imported():
    return sorted(name for name in ("transformers4rec", "transformers") if name in sys.modules)


def snapshot():
    """Everything registration touches, by identity."""
    import transformers
    from transformers4rec.config.transformer import transformer_registry
    from transformers4rec.torch.masking import masking_registry
    from transformers4rec.torch.utils.torch_utils import MappingTransformerMasking

    return (
        sorted(transformer_registry), sorted(masking_registry),
        transformer_registry["hstu"], transformer_registry["hstu-time"], transformer_registry["sasrec"],
        masking_registry["hstu-clm"], masking_registry["hstu-causal"],
        type(transformers.AutoConfig.for_model("hstu")), type(transformers.AutoConfig.for_model("sasrec")),
        transformers.MODEL_MAPPING[sys.modules["merlin_hstu.t4r.encoders"].HSTUConfig],
        MappingTransformerMasking.HSTUConfig,
    )


def check_auto_config():
    import transformers

    enc = sys.modules["merlin_hstu.t4r.encoders"]
    config = transformers.AutoConfig.for_model("hstu", hidden_size=8, num_attention_heads=2)
    assert type(config) is enc.HSTUConfig and config.hidden_size == 8, config
    assert type(transformers.AutoModel.from_config(config)) is enc.HSTUModel


def check_t4r():
    """The registry names resolve to merlin_hstu's classes, a model built from them runs, and registering
    again changes nothing."""
    import torch
    import transformers4rec.torch as tr
    from merlin.schema import ColumnSchema, Schema, Tags
    from transformers4rec.torch.masking import CausalLanguageModeling

    torch.set_num_threads(1)
    merlin_hstu = sys.modules["merlin_hstu"]
    enc = sys.modules["merlin_hstu.t4r.encoders"]
    check_auto_config()
    before = snapshot()
    assert before[2:9] == (
        enc.T4RecHSTUConfig, enc.T4RecHSTUTimeConfig, enc.T4RecSASRecConfig,
        enc.HSTUCausalLanguageModeling, enc.HSTUCausalLanguageModeling, enc.HSTUConfig, enc.SASRecConfig,
    ), before
    assert before[9:] == (enc.HSTUModel, [CausalLanguageModeling]), before
    assert merlin_hstu.HSTUConfig is enc.HSTUConfig and merlin_hstu.t4r.HSTUModel is enc.HSTUModel

    length, d_model, n_items = 6, 8, 20
    item = ColumnSchema(
        "item_id-list", dtype="int64", tags=[Tags.ITEM, Tags.ID, Tags.CATEGORICAL, Tags.LIST], is_list=True,
        is_ragged=True, dims=(None, (1, length)),
        properties={"domain": {"min": 0, "max": n_items - 1, "name": "item_id-list"}},
    )
    torch.manual_seed(0)
    inputs = tr.TabularSequenceFeatures.from_schema(
        Schema([item]), max_sequence_length=length, embedding_dim_default=d_model, d_output=d_model,
        masking="hstu-clm",
    )
    block = tr.TransformerBlock.from_registry(
        "hstu", d_model=d_model, n_head=2, n_layer=1, total_seq_length=length, masking=inputs.masking
    )
    assert type(inputs.masking) is enc.HSTUCausalLanguageModeling and type(block.transformer) is enc.HSTUModel
    model = tr.Model(tr.Head(tr.SequentialBlock(inputs, block), tr.NextItemPredictionTask(weight_tying=True)))
    model.eval()
    batch = {"item_id-list": torch.tensor([[3, 5, 7, 9, 11, 13], [2, 4, 6, 0, 0, 0]])}
    scores = model(batch)
    assert scores.shape == (2, n_items) and bool(torch.isfinite(scores).all()), scores
    # "hstu-clm" hands the encoder the row lengths, and HSTUModel zeroes the positions past them (plain
    # "causal" masking passes no lengths, so the padded positions would be computed like real ones).
    hidden = model.heads[0].body(batch)
    row_norms = hidden[1].abs().sum(-1)
    assert bool((row_norms[3:] == 0).all()) and bool((row_norms[:3] > 0).all()), row_norms

    merlin_hstu.register()
    enc.register()
    assert snapshot() == before


def reload_merlin_hstu(times):
    for _ in range(times):
        importlib.reload(sys.modules["merlin_hstu"])
'''


def run_python(code: str) -> None:
    """Run PRELUDE + code in a fresh interpreter from the repository root; it must print OK last."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code) + '\nprint("OK")\n'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines and lines[-1] == "OK", (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def test_import_merlin_hstu_does_not_import_t4r_or_transformers():
    run_python(
        """
        import merlin_hstu
        assert t4r_imported() == [], t4r_imported()
        assert hook_count() == 1
        reload_merlin_hstu(3)
        import merlin_hstu
        assert t4r_imported() == [] and hook_count() == 1, (t4r_imported(), hook_count())
        """
    )


def test_merlin_hstu_first_then_t4r_after_reloads_and_reimports():
    run_python(
        """
        import merlin_hstu
        reload_merlin_hstu(3)
        del sys.modules["merlin_hstu"]  # a fresh module object, as a second import after a sys.modules purge
        import merlin_hstu
        import merlin_hstu
        assert hook_count() == 1 and t4r_imported() == [], (hook_count(), t4r_imported())

        import transformers4rec.torch as tr  # the hook registers when this import completes
        assert "merlin_hstu.t4r.encoders" in sys.modules
        check_t4r()
        reload_merlin_hstu(3)  # after registration: registers again, idempotently, and adds no hook
        assert hook_count() == 1
        check_t4r()
        """
    )


def test_t4r_first_then_merlin_hstu_and_reloads():
    run_python(
        """
        import transformers4rec.torch as tr
        from transformers4rec.config.transformer import transformer_registry
        assert "hstu" not in transformer_registry  # nothing registered it yet: the check below can fail
        import merlin_hstu
        assert hook_count() == 0  # registered at once; nothing to wait for
        check_t4r()
        reload_merlin_hstu(3)
        import merlin_hstu
        assert hook_count() == 0
        check_t4r()
        """
    )


def test_transformers_first_then_merlin_hstu():
    run_python(
        """
        import transformers
        try:
            transformers.AutoConfig.for_model("hstu")
        except ValueError:
            pass
        else:
            raise AssertionError("'hstu' was registered before merlin_hstu was imported")
        import merlin_hstu
        check_auto_config()
        check_t4r()
        """
    )


def test_ipython_autoreload_then_transformers_then_t4r():
    """`%autoreload 2` as in a notebook.  A reload is forced by bumping the file's mtime (restored after): with
    no source change IPython 9's default diffing reloader re-runs nothing, so the bump is first checked to be
    harmless, then `--full` makes autoreload re-run the module the way it does after an edit (namespace emptied
    first, then re-executed)."""
    run_python(
        """
        from IPython.core.interactiveshell import InteractiveShell

        shell = InteractiveShell.instance()

        def cell(source):
            shell.run_cell(source, store_history=True).raise_error()

        path = os.path.join(os.getcwd(), "merlin_hstu", "__init__.py")
        stat = os.stat(path)

        def cell_after_edit(source):
            os.utime(path)  # as if just edited: autoreload re-runs the module before this cell
            try:
                cell(source)
            finally:
                os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

        shell.run_line_magic("load_ext", "autoreload")
        shell.run_line_magic("autoreload", "2")
        cell("import merlin_hstu\\nold_register = merlin_hstu.register")
        assert shell.user_ns["merlin_hstu"].__file__ == path
        cell("pass")  # autoreload notes the mtime of modules imported by the previous cell
        cell_after_edit("assert merlin_hstu.register is old_register")  # unchanged source: nothing re-run

        shell.run_line_magic("autoreload", "2 --full")
        for _ in range(3):
            cell_after_edit(
                "assert merlin_hstu.register is not old_register, 'autoreload did not re-run merlin_hstu'\\n"
                "old_register = merlin_hstu.register"
            )
        assert hook_count() == 1 and t4r_imported() == [], (hook_count(), t4r_imported())

        cell("import transformers")  # the hook registers when this import completes (it imports T4R)
        assert "merlin_hstu.t4r.encoders" in sys.modules
        check_auto_config()
        cell("import transformers4rec.torch as tr")
        check_t4r()
        cell_after_edit("assert merlin_hstu.register is not old_register\\nhstu = merlin_hstu.t4r.HSTUConfig")
        assert hook_count() == 1
        check_t4r()
        """
    )
