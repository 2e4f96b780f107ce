"""The hypernetwork module: the WebUI's layer layout and formula, and a file the WebUI's safe loader accepts."""

from __future__ import annotations

import collections
import pickle
import re
import zipfile

import pytest
import torch
from torch import nn

from dreambooth.config import HYPERNETWORK_ACTIVATIONS
from dreambooth.create import create_model
from dreambooth.errors import UserError
from dreambooth.train.hypernetwork import (
    ACTIVATIONS,
    Hypernetwork,
    HypernetworkSettings,
    load_hypernetwork,
    parse_layer_structure,
    save_hypernetwork,
    settings_from_file,
)
from dreambooth.train.models import load_models

# --- the WebUI's safe loader, as documented in HOST_API.md and its modules/safe.py: the rules, written down here ------
_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_parameter"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
            ("torch", "IntStorage"), ("torch", "LongStorage"), ("torch", "DoubleStorage"), ("torch", "ByteStorage"),
            ("torch", "BFloat16Storage"), ("torch", "float32"), ("__builtin__", "set")}


class _Restricted(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return None

    def find_class(self, module, name):
        if (module, name) not in _GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return getattr(collections, name) if module == "collections" else (lambda *a: None)


def webui_safe_check(path) -> None:
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            assert _ENTRY.match(name), f"the WebUI refuses the zip entry {name}"
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
        assert len(pkl) == 1
        with z.open(pkl[0]) as fh:
            _Restricted(fh).load()


def _network(**kw) -> Hypernetwork:
    torch.manual_seed(0)
    return Hypernetwork([8], HypernetworkSettings(**kw))


def test_config_offers_exactly_the_activations_the_module_builds():
    assert tuple(ACTIVATIONS) == HYPERNETWORK_ACTIVATIONS
    assert isinstance(ACTIVATIONS["swish"](), nn.Hardswish)  # the WebUI's mapping, kept so files mean the same


def test_layer_structure_is_parsed_and_checked():
    assert parse_layer_structure("1, 2, 1") == (1.0, 2.0, 1.0)
    assert parse_layer_structure("1,1.5,1.5,1") == (1.0, 1.5, 1.5, 1.0)
    for bad, match in (("2, 1", "start and end with 1"), ("1", "at least two"), ("1, x, 1", "not a list"),
                       ("1, -2, 1", "outside")):
        with pytest.raises(UserError, match=match):
            parse_layer_structure(bad)


@pytest.mark.parametrize(("settings", "keys", "kinds"), [
    (dict(layer_structure="1, 2, 1"), ["linear.0", "linear.1"], ["Linear", "Linear"]),
    (dict(layer_structure="1, 2, 1", activation="relu", layer_norm=True, dropout=0.3),
     ["linear.0", "linear.2", "linear.4", "linear.5"],
     ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"]),
    (dict(layer_structure="1, 2, 2, 1", activation="tanh", activate_output=True),
     ["linear.0", "linear.2", "linear.4"], ["Linear", "Tanh", "Linear", "Tanh", "Linear", "Tanh"]),
])
def test_the_layers_follow_the_webui_layout(settings, keys, kinds):
    module = _network(**settings).module(8, "k")
    assert [type(m).__name__ for m in module.linear] == kinds
    assert sorted({k.rsplit(".", 1)[0] for k in module.state_dict()}) == keys
    assert module.linear[0].weight.shape == (int(8 * float(str(settings["layer_structure"]).split(",")[1])), 8)


def test_dropout_structure_is_the_webuis():
    assert HypernetworkSettings("1, 2, 1", dropout=0.0).dropout_structure == [0.0, 0.0, 0.0]
    assert HypernetworkSettings("1, 2, 2, 1", dropout=0.3).dropout_structure == [0.0, 0.3, 0.3, 0.0]
    # a file from before dropout_structure: the WebUI's reading of use_dropout / last_layer_dropout
    old = settings_from_file({"layer_structure": [1, 2, 2, 1], "use_dropout": True, "last_layer_dropout": False})
    assert old.dropout_structure == [0.0, 0.3, 0.0, 0.0]


def test_the_module_computes_x_plus_mlp_times_strength():
    network = _network(layer_structure="1, 2, 1", activation="relu").eval()
    module = network.module(8, "v")
    x = torch.randn(2, 5, 8)
    mlp = module.linear(x)
    torch.testing.assert_close(module(x), x + mlp)
    network.multiplier = 0.5
    torch.testing.assert_close(module(x), x + 0.5 * mlp)


def test_dropout_acts_only_while_the_attention_trains():
    network = _network(layer_structure="1, 4, 1", dropout=0.5)
    module = network.module(8, "k")
    x = torch.randn(4, 8)
    assert not torch.equal(module(x, True), module(x, True))  # random in training
    torch.testing.assert_close(module(x, False), module(x, False))


def test_hooks_feed_to_k_and_to_v_where_the_webui_applies_it(tmp_path, tiny_checkpoint):
    models = load_models(create_model(tiny_checkpoint("sd1"), "m", tmp_path).working, "sd1")
    width = models.unet.config.cross_attention_dim
    attentions = {n: m for n, m in models.unet.named_modules() if isinstance(getattr(m, "to_k", None), nn.Linear)}
    expected = sorted(f"{n}.to_{w}" for n, m in attentions.items() if m.to_k.in_features == width for w in "kv")
    assert all(f"{n}.to_k" in expected for n in attentions if n.endswith("attn2"))  # every cross-attention
    torch.manual_seed(0)
    network = Hypernetwork([width], HypernetworkSettings("1, 2, 1", "relu")).attach(
        models.unet, (models.vae, *models.text_encoders))
    assert sorted(network.hooked) == expected
    assert not any(p.requires_grad for p in models.unet.parameters())
    assert all(p.requires_grad for p in network.parameters())
    # one cross-attention: to_k sees k(context), to_v sees v(context)
    name = next(n for n in attentions if n.endswith("attn2"))
    attn = attentions[name]
    context = torch.randn(1, 7, width)
    k_in, v_in = network.module(width, "k")(context), network.module(width, "v")(context)
    torch.testing.assert_close(attn.to_k(context), nn.functional.linear(k_in, attn.to_k.weight, attn.to_k.bias))
    torch.testing.assert_close(attn.to_v(context), nn.functional.linear(v_in, attn.to_v.weight, attn.to_v.bias))
    network.remove()
    torch.testing.assert_close(attn.to_k(context), nn.functional.linear(context, attn.to_k.weight, attn.to_k.bias))
    assert all(p.requires_grad for p in models.unet.parameters())  # flags back


def test_file_layout_safe_loader_and_round_trip(tmp_path):
    network = _network(layer_structure="1, 1.5, 1", activation="elu", layer_norm=True, dropout=0.2)
    for p in network.parameters():  # trained-looking weights
        p.data.normal_()
    path = save_hypernetwork(tmp_path / "hn_12.pt", network, name="hn_12", step=12,
                             checkpoint_hash="0123456789abcdef" * 4, checkpoint_name="base")
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    webui_safe_check(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["layer_structure"] == [1.0, 1.5, 1.0] and state["activation_func"] == "elu"
    assert state["is_layer_norm"] is True and state["weight_initialization"] == "Normal"
    assert state["use_dropout"] is True and state["dropout_structure"] == [0.0, 0.2, 0.0]
    assert state["last_layer_dropout"] is True and state["activate_output"] is False
    assert state["name"] == "hn_12" and state["step"] == 12
    assert state["sd_checkpoint"] == "0123456789" and state["sd_checkpoint_name"] == "base"
    assert [k for k in state if isinstance(k, int)] == [8]
    k_state, v_state = state[8]
    assert type(k_state) is dict and sorted(k_state) == sorted(network.module(8, "k").state_dict())
    assert k_state["linear.0.weight"].shape == (12, 8) and k_state["linear.0.weight"].dtype == torch.float32
    loaded = load_hypernetwork(path).eval()
    network.eval()
    x = torch.randn(3, 4, 8)
    for which in "kv":
        torch.testing.assert_close(loaded.module(8, which)(x), network.module(8, which)(x), rtol=0, atol=0)


def test_a_file_that_is_not_a_hypernetwork_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="no hypernetwork layers"):
        load_hypernetwork(path)
    with pytest.raises(UserError, match="does not exist"):
        load_hypernetwork(tmp_path / "missing.pt")
