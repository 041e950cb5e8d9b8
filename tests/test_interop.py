"""Weight import from Hugging Face GPT-2: logits parity with transformers; and the peers
(open_clip, timm, transformers) are imported by mmssl.interop only inside functions.

(open_clip parity is in test_interop_open_clip.py, timm in test_interop_timm.py; the
method and the helpers all three share are in interop_helpers.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interop_helpers import TOL, max_diff, perturb_

from mmssl.interop import gpt2_model_config, load_hf_gpt2
from mmssl.models import resolve_model_config

transformers = pytest.importorskip("transformers")


def small_gpt2_config(**kw):
    base = dict(
        n_layer=2,
        n_embd=128,
        n_head=4,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=999,
        eos_token_id=999,
    )
    return transformers.GPT2Config(**{**base, **kw})


def gpt2_pair(seed: int = 0, **kw):
    torch.manual_seed(seed)
    peer = perturb_(transformers.GPT2LMHeadModel(small_gpt2_config(**kw)), seed=seed + 1)
    return peer, load_hf_gpt2(peer)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_word_embeddings": False, "activation_function": "gelu", "n_inner": 200},
        {"n_embd": 88, "n_head": 4, "n_inner": 120},  # 88 * (120 / 88) is 119.999... in floats
    ],
    ids=["tied_gelu_new", "untied_gelu", "inner_width_from_a_ratio"],
)
def test_gpt2_logits_parity(kw):
    peer, model = gpt2_pair(**kw)
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = peer(ids).logits
        out = model.lm_logits(ids)
    err = max_diff(out, ref)
    print(f"GPT-2 small config {kw}: logits max abs diff {err:.3g}")
    assert err <= TOL
    assert model.cfg.text.tie_embeddings == kw.get("tie_word_embeddings", True)


def test_gpt2_from_saved_directory(tmp_path):
    peer, _ = gpt2_pair()
    peer.save_pretrained(tmp_path)  # config.json + model.safetensors (tied head stored once)
    model = load_hf_gpt2(tmp_path)
    ids = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        assert max_diff(model.lm_logits(ids), peer(ids).logits) <= TOL


@pytest.mark.slow
def test_gpt2_124m_is_the_registry_gpt_124m():
    cfg = transformers.GPT2Config()
    assert gpt2_model_config(cfg) == resolve_model_config("gpt_124m")
    torch.manual_seed(0)
    peer = transformers.GPT2LMHeadModel(cfg).eval()
    model = load_hf_gpt2(peer)
    assert model.num_params() == sum(p.numel() for p in peer.parameters())  # tied head once
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = max_diff(model.lm_logits(ids), peer(ids).logits)
    print(f"GPT-2 124M logits max abs diff {err:.3g}")
    assert err <= TOL


# ---------------------------------------------------------------- import hygiene


def test_interop_modules_import_the_peers_only_inside_functions():
    """The peers are optional: no module-level import of them anywhere in mmssl.interop (a
    static check, as the test process has them loaded already)."""
    import ast

    import mmssl.interop

    peers = {"open_clip", "timm", "transformers"}
    for path in Path(mmssl.interop.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not {n.split(".")[0] for n in names} & peers, (path.name, names)
