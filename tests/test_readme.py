"""The README's Python example runs exactly as written and gives a working T4R model."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_t4r_snippet_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "README.md should hold exactly one Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    model, data = namespace["model"], namespace["data"]
    import pandas as pd

    df = pd.read_parquet(data.path)
    batch = {}
    for name in ("item_id/list", "category/list"):
        values = [torch.as_tensor(v[:20], dtype=torch.long) for v in df[name].head(8)]
        batch[name] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
    model.train()
    out = model(batch, training=True)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    encoder_grads = [p.grad for n, p in model.named_parameters() if "uvqk" in n]
    assert encoder_grads and all(g is not None and g.abs().sum() > 0 for g in encoder_grads)
    model.eval()
    scores = model(batch)
    assert scores.shape[0] == 8 and torch.isfinite(scores).all()
