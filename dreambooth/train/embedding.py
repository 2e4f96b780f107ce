"""Textual Inversion: learn the embedding of a new word, saved as an embedding file the WebUI loads.

The new word ``token`` gets ``vectors`` placeholder tokens (``token``, ``token_1`` .. ``token_{n-1}``, the diffusers
convention, one token per vector), added to every tokenizer of the model (SDXL: both). Each text encoder's token
embedding is resized to hold them, and their rows start from the embedding of ``init_word`` (or small random
values).

What trains is one small ``[n, width]`` tensor per text encoder (:meth:`TextualInversion.parameters`), not the
embedding matrix: a forward hook on the token embedding puts these vectors in where the placeholder ids are, the
way the WebUI itself trains and applies embeddings. So the optimizer only ever sees the new vectors: the old rows of
the embedding matrix (and everything else) stay bitwise equal whatever the optimizer does (weight decay included),
and its state is a few KB instead of two copies of the whole vocabulary. :meth:`TextualInversion.after_step` copies
the trained vectors into the new rows of the matrix, so the text encoder is also right without the hook.

A second hook keeps the pooled output (SDXL's second encoder conditions on it) at the end-of-text token: CLIP
configs with ``eos_token_id`` 2 (all of Stable Diffusion's) pool at the *largest* token id, which would be a
placeholder now; the hook pools where the model would pool if the placeholders were ordinary words, as the WebUI
(whose token ids stay in the vocabulary) does.

Files (:func:`save_embedding`): SD 1.x/2.x a single tensor ``emb_params`` ``[n, width]``; SDXL ``clip_l`` ``[n, 768]``
and ``clip_g`` ``[n, 1280]``. The WebUI takes the trigger word from the file name (``<token>.safetensors``) and
skips a file whose width does not match the loaded model.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..families import SD1, SD2, SD2V, SDXL, get_family
from ..platform_compat import reserved_on_windows
from ..working import save_tensors

if TYPE_CHECKING:
    from ..config import TrainConfig

log = logging.getLogger(__name__)

MAX_VECTORS = 75  # one 77-token window less BOS and EOS
RANDOM_INIT = ("", "*")
RANDOM_STD = 0.01
SINGLE_KEY = "emb_params"  # the single-tensor layout (SD 1.x/2.x), as kohya writes it and the WebUI reads any key
# one entry per text encoder, in the order of Models.text_encoders
ENCODER_KEYS: dict[str, tuple[str, ...]] = {SD1: ("clip_l",), SD2: ("clip_h",), SD2V: ("clip_h",),
                                            SDXL: ("clip_l", "clip_g")}
MODELSPEC_VERSION = "1.0.0"
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
_TOKEN_CHARS = "._-"


@dataclass
class EmbeddingSettings:
    token: str  # the new word, e.g. "zwx-style": lower case letters, digits and . _ -, not already a word of the vocab
    vectors: int = 1  # vectors per token (1..75)
    init_word: str = "*"  # start from this word's token embedding(s); "" or "*": small random values
    seed: int = 0  # for the random start

    def __post_init__(self) -> None:
        token = self.token
        if not isinstance(token, str) or not token:
            raise UserError("the embedding's token must not be empty", "use a new word such as 'zwx-style'")
        if any(c.isspace() for c in token):
            raise UserError(f"the embedding's token {token!r} contains spaces",
                            "use one word; join parts with '-' or '_'")
        bad = sorted({c for c in token if not (c.isalnum() or c in _TOKEN_CHARS)})
        if bad:
            raise UserError(f"the embedding's token {token!r} contains {''.join(bad)!r}",
                            "use letters, digits, '.', '_' and '-' (the WebUI names the embedding by its file name)")
        if reserved_on_windows(token):
            raise UserError(f"the embedding's token {token!r} is a device name on Windows, where no file can be "
                            f"called {token}.safetensors", "pick another word, e.g. 'zwx-style'")
        if token != token.lower():
            raise UserError(f"the embedding's token {token!r} has upper case letters",
                            f"CLIP reads every prompt in lower case; use {token.lower()!r}")
        if not isinstance(self.vectors, int) or isinstance(self.vectors, bool) or not 1 <= self.vectors <= MAX_VECTORS:
            raise UserError(f"vectors per token must be a whole number from 1 to {MAX_VECTORS}, not {self.vectors!r}")
        if not isinstance(self.init_word, str):
            raise UserError(f"the initialisation word must be text, not {self.init_word!r}",
                            "leave it empty (or '*') for a random start")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UserError(f"the embedding seed must be a whole number, not {self.seed!r}")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> EmbeddingSettings:
        return cls(token=cfg.embedding_token, vectors=cfg.embedding_vectors, init_word=cfg.embedding_init_word,
                   seed=cfg.seed)

    @property
    def names(self) -> list[str]:
        """The placeholder tokens, one per vector: ``token``, ``token_1`` .. ``token_{n-1}``."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.vectors)]


def _resize(encoder: nn.Module, rows: int) -> None:
    """``resize_token_embeddings`` on any transformers version, without touching the global RNG."""
    kwargs: dict[str, Any] = {}
    if "mean_resizing" in inspect.signature(encoder.resize_token_embeddings).parameters:
        kwargs["mean_resizing"] = False  # transformers >= 4.46; we set the new rows ourselves
    device = encoder.get_input_embeddings().weight.device
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # 4.x initialises the new rows from the global RNG
        encoder.resize_token_embeddings(rows, **kwargs)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def _initial_vectors(tokenizer: Any, encoder: nn.Module, settings: EmbeddingSettings,
                     generator: torch.Generator) -> Tensor:
    """``[n, width]`` fp32 on the CPU: from the init word's token embeddings, or small random values.

    A word of ``k`` tokens: with ``k >= n`` vector ``i`` is the mean of the ``i``-th of ``n`` near-equal runs of
    its tokens (``n = 1``: the mean of all); with ``k < n`` the tokens repeat (vector ``i`` = token ``i mod k``).
    """
    weight = encoder.get_input_embeddings().weight
    n = settings.vectors
    word = settings.init_word.strip()
    if word in RANDOM_INIT:
        return torch.randn(n, weight.shape[1], generator=generator) * RANDOM_STD
    ids = _tokenize(tokenizer, word)
    if not ids:
        raise UserError(f"the initialisation word {word!r} gives no tokens", "use a plain word, or '*' for random")
    if max(ids) >= weight.shape[0]:
        raise UserError(f"the initialisation word {word!r} uses a token the text encoder has no embedding for",
                        "use a plain word")
    rows = weight.detach()[torch.tensor(ids, device=weight.device)].float().cpu()
    if len(ids) >= n:
        return torch.stack([chunk.mean(0) for chunk in torch.tensor_split(rows, n)])
    return rows[torch.arange(n) % len(ids)].clone()


def _prompt_pattern(names: list[str]) -> re.Pattern[str]:
    """The token as a whole word (not inside a longer word or name), in any case, with the rest of its expansion
    when that follows already."""
    rest = "".join(r"\s+" + re.escape(name) for name in names[1:])
    return re.compile(r"(?<![\w-])" + re.escape(names[0]) + (f"(?:{rest})?" if rest else "") + r"(?![\w-])",
                      re.IGNORECASE)


def _check_token_free(tokenizer: Any, settings: EmbeddingSettings) -> None:
    added = tokenizer.get_added_vocab()
    taken = [name for name in settings.names if name in added]
    if taken:
        raise UserError(f"the tokenizer already has the token {taken[0]!r} (another embedding?)",
                        "pick another word, or remove the other embedding first")
    vocab = tokenizer.get_vocab()
    known = [name for name in settings.names if name in vocab]
    if known or len(_tokenize(tokenizer, settings.token)) == 1:
        raise UserError(f"the embedding's token {(known or [settings.token])[0]!r} is already a word of the vocabulary",
                        "pick a new, rare word (e.g. 'zwx-style'); training would change what a known word means")


class _Slot:
    """One text encoder: its tokenizer, placeholder ids, trained vectors and hooks."""

    def __init__(self, key: str, encoder: nn.Module, tokenizer: Any) -> None:
        self.key = key
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.tokenizer_state = copy.deepcopy(tokenizer.__dict__)  # to take our tokens out again (any tokenizer class)
        self.base_rows = int(encoder.get_input_embeddings().weight.shape[0])  # rows before ours
        self.rows = self.base_rows
        self.ids: list[int] = []
        self.vectors = nn.Parameter(torch.empty(0))
        self.lookup = torch.empty(0, dtype=torch.long)  # token id -> row of ``vectors`` (-1: not ours)
        self.handles: list[Any] = []
        self.active = True
        config = getattr(encoder, "config", None)
        self.legacy_pooling = getattr(config, "eos_token_id", 2) == 2
        self.eos_id = tokenizer.eos_token_id

    def attach(self, names: list[str], start: Tensor, dtype: torch.dtype) -> None:
        """Add the tokens, resize the embedding, set the new rows, hook in."""
        added = self.tokenizer.add_tokens(names)
        ids = [int(i) for i in self.tokenizer.convert_tokens_to_ids(names)]
        if added != len(names) or len(set(ids)) != len(names) or min(ids) < self.base_rows:
            raise UserError(f"the tokenizer would not take {names[0]!r} as a new token", "pick another word")
        self.ids = ids
        self.rows = max(self.base_rows, len(self.tokenizer), max(ids) + 1)
        _resize(self.encoder, self.rows)
        embedding = self.encoder.get_input_embeddings()
        self.vectors = nn.Parameter(start.to(device=embedding.weight.device, dtype=dtype))
        lookup = torch.full((self.rows,), -1, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        self.lookup = lookup.to(embedding.weight.device)
        self.sync()
        self.handles.append(embedding.register_forward_hook(self.embedding_hook, with_kwargs=True))
        self.handles.append(_pooling_module(self.encoder).register_forward_hook(self.pooled_hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        rows = int(self.encoder.get_input_embeddings().weight.shape[0])
        if rows == self.rows and rows != self.base_rows:
            _resize(self.encoder, self.base_rows)
        elif rows != self.rows:
            log.warning("the %s token embedding was resized by someone else (%d rows); leaving it", self.key, rows)
        self.tokenizer.__dict__.clear()
        self.tokenizer.__dict__.update(self.tokenizer_state)
        self.active = False

    def embedding_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        ids = args[0] if args else kwargs["input"]
        lookup = self.lookup
        if lookup.device != ids.device:
            lookup = self.lookup = lookup.to(ids.device)
        slot = lookup[ids]
        new = self.vectors.to(device=output.device, dtype=output.dtype)[slot.clamp(min=0)]
        # always through torch.where (no data-dependent branch, no device sync): the output depends on the vectors
        return torch.where((slot >= 0).unsqueeze(-1), new, output)

    def pooled_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None or not isinstance(output, tuple | Mapping):
            return output
        hidden = output[0]
        ids = ids.to(hidden.device)
        if self.legacy_pooling:  # the model pools at the largest id: do it as if ours were ordinary words
            position = torch.where(ids >= self.base_rows, -1, ids).argmax(dim=-1)
        else:
            position = (ids == self.eos_id).int().argmax(dim=-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), position]
        if isinstance(output, tuple) and not isinstance(output, Mapping):
            return (output[0], pooled, *output[2:])
        output["pooler_output"] = pooled
        return output

    @torch.no_grad()
    def sync(self) -> None:
        weight = self.encoder.get_input_embeddings().weight
        weight[torch.tensor(self.ids, device=weight.device)] = self.vectors.detach().to(weight.device, weight.dtype)


def _pooling_module(encoder: nn.Module) -> nn.Module:
    """The module whose output holds ``pooler_output`` (transformers 4: CLIPTextTransformer ``text_model``;
    5: CLIPTextModel itself, or ``text_model`` of CLIPTextModelWithProjection)."""
    return getattr(encoder, "text_model", encoder)


class TextualInversion:
    """A new word for the text encoder(s) of ``models`` (a :class:`~dreambooth.train.models.Models`).

    On creation: the placeholder tokens are added to every tokenizer (in place), every token embedding is resized,
    the new rows set from ``init_word``, and (``freeze``) every parameter of the models (UNet, VAE, text encoders)
    is frozen (the old flags come back with :meth:`remove`). Create it before the optimizer and before anything
    tokenizes captions. The vectors are fp32 (``dtype``) on the device of each text encoder's embedding; move
    them with :meth:`to` (before making the optimizer); the hooks cast them to the embedding's dtype and device.

    Use: train :meth:`parameters`, tokenize :meth:`prompt` (captions, preview prompts), call :meth:`after_step`
    after each optimizer step, save with :func:`save_embedding`, resume with :meth:`state_dict` /
    :meth:`load_state_dict`.
    """

    def __init__(self, models: Any, settings: EmbeddingSettings, *, freeze: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        self.family = models.family.id
        self.settings = settings
        self.keys = ENCODER_KEYS[self.family]
        encoders, tokenizers = list(models.text_encoders), list(models.tokenizers)
        if len(encoders) != len(self.keys) or len(tokenizers) != len(self.keys):
            raise ValueError(f"a {models.family.label} model has {len(self.keys)} text encoder(s) and tokenizer(s), "
                             f"got {len(encoders)} and {len(tokenizers)}")
        for tokenizer in tokenizers:
            _check_token_free(tokenizer, settings)
        generator = torch.Generator().manual_seed(settings.seed)
        starts = [_initial_vectors(t, e, settings, generator) for t, e in zip(tokenizers, encoders, strict=True)]

        self._slots: list[_Slot] = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        try:
            for key, encoder, tokenizer, start in zip(self.keys, encoders, tokenizers, starts, strict=True):
                slot = _Slot(key, encoder, tokenizer)
                self._slots.append(slot)
                slot.attach(settings.names, start, dtype)
        except BaseException:
            self.remove()
            raise
        if freeze:
            roots = [getattr(models, "unet", None), getattr(models, "vae", None), *encoders]
            self._frozen = [(p, p.requires_grad) for root in roots if root is not None for p in root.parameters()]
            for p, _ in self._frozen:
                p.requires_grad_(False)
        self._pattern = _prompt_pattern(settings.names)
        log.info("textual inversion %r: %d vector(s) per encoder (%s), ids %s, init %s", settings.token,
                 settings.vectors, ", ".join(f"{s.key} {s.vectors.shape[1]}" for s in self._slots),
                 self._slots[0].ids, repr(settings.init_word) if settings.init_word.strip() not in RANDOM_INIT
                 else "random")

    # --- what the trainer uses ------------------------------------------------------------------------------------

    @property
    def token(self) -> str:
        return self.settings.token

    @property
    def names(self) -> list[str]:
        """The placeholder tokens: ``token``, ``token_1`` .. ``token_{n-1}``."""
        return self.settings.names

    @property
    def attached(self) -> bool:
        return bool(self._slots) and all(s.active for s in self._slots)

    def token_ids(self) -> dict[str, list[int]]:
        """The placeholder token ids per encoder key."""
        return {s.key: list(s.ids) for s in self._slots}

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: one ``[n, width]`` tensor per text encoder."""
        return [s.vectors for s in self._slots]

    def prompt(self, text: str) -> str:
        """``text`` with the token expanded to all its placeholder tokens (``"zwx-style"`` -> ``"zwx-style
        zwx-style_1 ..."``), matched as a whole word, in any case (CLIP lowercases); an expansion already there is
        kept as it is."""
        return self._pattern.sub(" ".join(self.names), text)

    def after_step(self) -> None:
        """After each optimizer step: copy the vectors into the new rows of the token embeddings."""
        for slot in self._slots:
            slot.sync()

    def vectors(self) -> dict[str, Tensor]:
        """``{encoder key: [n, width]}`` (``clip_l`` SD 1.x, ``clip_h`` SD 2.x, ``clip_l`` + ``clip_g`` SDXL):
        detached copies."""
        return {s.key: s.vectors.detach().clone() for s in self._slots}

    def state_dict(self) -> dict[str, Tensor]:
        """For the resume state: the same as :meth:`vectors`."""
        return self.vectors()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict` (any float dtype); also takes :func:`load_embedding`'s ``emb_params`` for a
        one-encoder model. The parameters keep their identity (an optimizer over them stays valid)."""
        state = dict(state)
        if len(self.keys) == 1 and set(state) == {SINGLE_KEY}:
            state = {self.keys[0]: state[SINGLE_KEY]}
        if set(state) != set(self.keys):
            raise UserError(f"the embedding state has {sorted(state)}, this model needs {list(self.keys)}",
                            "use an embedding trained for this model family")
        for slot in self._slots:
            value = state[slot.key]
            if tuple(value.shape) != tuple(slot.vectors.shape):
                raise UserError(f"the embedding's {slot.key} vectors have shape {list(value.shape)}, this one has "
                                f"{list(slot.vectors.shape)}", "use the same model and vectors per token")
            if not value.is_floating_point():
                raise UserError(f"the embedding's {slot.key} vectors are not floating point ({value.dtype})")
        with torch.no_grad():
            for slot in self._slots:
                slot.vectors.copy_(state[slot.key].to(slot.vectors.device, slot.vectors.dtype))
        self.after_step()

    def to(self, device: torch.device | str) -> TextualInversion:
        """Move the vectors (in place: the same parameter objects)."""
        for slot in self._slots:
            slot.vectors.data = slot.vectors.data.to(device)
        return self

    def remove(self) -> None:
        """Take the word out: hooks off, token embeddings back to their old size (old rows bitwise as they were),
        tokenizers as they were, requires_grad flags restored. Idempotent."""
        for slot in reversed(self._slots):
            if slot.active:
                slot.detach()
        for p, flag in getattr(self, "_frozen", []):
            p.requires_grad_(flag)
        self._frozen = []


# --- files --------------------------------------------------------------------------------------------------------

def _metadata_str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def embedding_metadata(ti: TextualInversion, step: int, family: str) -> dict[str, str]:
    """The metadata of an embedding file: name, step, vectors, base family and the SAI model spec."""
    fam = get_family(family)
    return {
        "name": ti.token,
        "step": str(int(step)),
        "vectors": str(ti.settings.vectors),
        "init_word": ti.settings.init_word,
        "base_model_family": fam.id,
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{fam.modelspec_architecture}/textual-inversion",
        "modelspec.implementation": IMPL_STABILITY_AI if fam.id == SDXL else IMPL_DIFFUSERS,
        "modelspec.title": ti.token,
        "modelspec.date": datetime.now().isoformat(timespec="seconds"),
        "modelspec.resolution": f"{fam.resolution}x{fam.resolution}",
        "modelspec.prediction_type": "v" if fam.prediction_type == "v_prediction" else "epsilon",
    }


def embedding_tensors(ti: TextualInversion) -> dict[str, Tensor]:
    """The tensors of the file: ``{"emb_params": [n, w]}`` (one encoder) or ``{"clip_l", "clip_g"}`` (SDXL)."""
    vectors = ti.vectors()
    if ti.family == SDXL:
        return vectors
    return {SINGLE_KEY: next(iter(vectors.values()))}


def save_embedding(path: Path, ti: TextualInversion, step: int, family: str | None = None, *,
                   metadata: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the embedding as a ``.safetensors`` file the WebUI loads (atomically), in ``dtype`` (None: as trained,
    fp32). ``family`` (default: the model's) must be the model's. The caller's ``metadata`` goes on top, except the
    keys that describe the tensors (name, step, vectors, base family, ``modelspec.architecture``).

    The WebUI names an embedding by its file name: ``<token>.safetensors`` is triggered by the token itself.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"an embedding file must end in .safetensors, not {path.name!r}")
    family = get_family(family or ti.family).id
    if family != ti.family:
        raise ValueError(f"this embedding was trained on a {get_family(ti.family).label} model, not {family}")
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
             for k, v in embedding_tensors(ti).items()}
    own = embedding_metadata(ti, step, family)
    forced = {k: own[k] for k in ("name", "step", "vectors", "base_model_family", "modelspec.architecture")}
    meta = {**own, **{str(k): _metadata_str(v) for k, v in (metadata or {}).items()}, **forced}
    save_tensors(path, state, meta)
    if path.stem != ti.token:
        log.info("saved embedding %s: the WebUI triggers it with %r (the file name), trained as %r",
                 path, path.stem, ti.token)
    else:
        log.info("saved embedding %s (%d vector(s), step %d)", path, ti.settings.vectors, step)
    return path


def load_embedding(path: Path, family: str | None = None) -> dict[str, Tensor]:
    """Read an embedding ``.safetensors``: ``{"emb_params": [n, w]}`` (a single tensor under any key; a 1-D one
    becomes ``[1, w]``) or ``{"clip_l": [n, wl], "clip_g": [n, wg]}`` (SDXL). With ``family``, the layout must be
    that family's. Shapes are checked (2-D, 1 to 75 vectors, both SDXL parts with the same count)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        data = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"embedding file {path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{path} is not a safetensors embedding ({err})") from None
    if set(data) == {"clip_l", "clip_g"}:
        out = dict(data)
    elif len(data) == 1:
        emb = next(iter(data.values()))
        out = {SINGLE_KEY: emb.unsqueeze(0) if emb.dim() == 1 else emb}
    else:
        raise UserError(f"{path.name} holds {sorted(data)}: not an embedding",
                        "an embedding holds one tensor, or clip_l and clip_g (SDXL)")
    for key, value in out.items():
        if value.dim() != 2 or not value.is_floating_point() or not 1 <= value.shape[0] <= MAX_VECTORS:
            raise UserError(f"{path.name}: {key} has shape {list(value.shape)} ({value.dtype}), an embedding is "
                            f"[vectors (1..{MAX_VECTORS}), width] floats")
    if SINGLE_KEY not in out and out["clip_l"].shape[0] != out["clip_g"].shape[0]:
        raise UserError(f"{path.name}: clip_l has {out['clip_l'].shape[0]} vectors, clip_g "
                        f"{out['clip_g'].shape[0]}")
    if family is not None:
        sdxl = get_family(family).id == SDXL
        if sdxl != (SINGLE_KEY not in out):
            raise UserError(f"{path.name} is an {'SD 1.x/2.x' if sdxl else 'SDXL'} embedding, not one for "
                            f"{get_family(family).label}")
    return out
