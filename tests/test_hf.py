"""Hugging Face encoders (the ``hf`` extra): described through torch.export, fused back into the user's class.
Tiny configs, random weights, nothing downloaded."""

import warnings

import pytest
import torch

from hetfuse import FusionConfig, fuse, prepare_fusion
from hetfuse.errors import UnsupportedModelError
from hetfuse.graph import check_permutation_invariance, describe, permuted_copy
from hetfuse.hf import Logits

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _bert(layers=2, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                     attn_implementation="sdpa")
    return transformers.BertForSequenceClassification(config).eval()


def _vit(layers=2, seed=0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                                    num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                                    num_labels=10, attn_implementation="sdpa")
    return transformers.ViTForImageClassification(config).eval()


def _randomize_norms(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


KINDS = {"bert": (_bert, lambda n: torch.randint(0, 50, (n, 6), generator=torch.Generator().manual_seed(1))),
         "vit": (_vit, lambda n: torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)))}


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_hugging_face_encoder_is_described_through_torch_export_and_checked(kind):
    build, data = KINDS[kind]
    model = Logits(_randomize_norms(build(), 0)).eval()
    x = data(16)
    g = describe(model, example=x[:2])
    assert len(g.attention) == 2 and sum(s.stream for s in g.spaces) == 1
    check_permutation_invariance(model, g, x)
    twin, _ = permuted_copy(model, g, seed=2)
    with torch.no_grad():
        assert (twin(x) - model(x)).abs().max() < 1e-5


@pytest.mark.parametrize("kind", list(KINDS))
def test_hugging_face_models_fuse_back_into_their_own_class(kind):
    build, data = KINDS[kind]
    a, b = (_randomize_norms(build(seed=s), s) for s in (0, 1))
    x = data(32)
    prep = prepare_fusion([a, b], x, FusionConfig(match="perm-acts", samples=32, repair="none", target=0))
    moved = prep.combine([0.0, 1.0], repair=False)
    assert type(moved) is type(a)
    torch.testing.assert_close(_logits(moved, x), _logits(b, x), rtol=1e-4, atol=1e-5)  # heads kept whole
    res = fuse([a, b], x, samples=32)
    assert type(res.model) is type(a) and _logits(res.model, x).shape == _logits(a, x).shape


def test_vits_of_different_depths_fuse_exactly_at_weights_one_zero():
    x = KINDS["vit"][1](32)
    a, b = _vit(2, 0), _vit(3, 1)
    res = fuse([a, b], x, weights=[1.0, 0.0], samples=32, repair="none")
    assert type(res.model) is type(b) and res.model.config.num_hidden_layers == 3  # the deeper input's class
    torch.testing.assert_close(_logits(res.model, x), _logits(a, x), rtol=1e-5, atol=1e-6)  # pre-LN: exact


def test_berts_of_different_depths_fuse_with_a_measured_warning():
    x = KINDS["bert"][1](32)
    a, b = _bert(2, 0), _bert(3, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fuse([a, b], x, samples=32)
    assert any("post-norm" in str(w.message) and "change its outputs by" in str(w.message) for w in caught)
    assert any("post-norm" in n for n in res.report["notes"])
    assert type(res.model) is type(b) and res.model.config.num_hidden_layers == 3


def test_a_model_both_tracers_refuse_names_both():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(UnsupportedModelError, match=r"torch\.fx: .*control flow.*; torch\.export: "):
        describe(Branchy(), example=torch.randn(2, 4))


def test_a_fused_hugging_face_model_saves_and_loads(tmp_path):
    from hetfuse import load_model, save_model

    x = KINDS["bert"][1](32)
    res = fuse([_bert(2, 0), _bert(3, 1)], x, samples=32)
    save_model(res.model, tmp_path / "fused.safetensors")
    again = load_model(tmp_path / "fused.safetensors", base=_bert(3, 7))  # the class, any weights
    torch.testing.assert_close(_logits(again, x), _logits(res.model, x))


def test_hugging_face_models_of_different_widths_and_depths_fuse_into_the_target_widths():
    def vit(layers, hidden, seed):
        torch.manual_seed(seed)
        config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
                                        num_labels=10, attn_implementation="sdpa")
        return transformers.ViTForImageClassification(config).eval()

    x = KINDS["vit"][1](32)
    a, b = vit(1, 16, 0), vit(2, 24, 1)
    res = fuse([a, b], x, weights=[1.0, 0.0], samples=32, match="ot-acts", repair="none", target=0)
    out = res.model(x)  # no input model has the fused structure at these widths: the balanced network comes back
    out = out.logits if hasattr(out, "logits") else out
    torch.testing.assert_close(out, _logits(a, x), rtol=1e-5, atol=1e-6)
