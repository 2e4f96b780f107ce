"""The one place that knows how gradio 3.x (the WebUI's 3.41.2) and 4.x (Forge) differ.

Everything else in the UI builds components and wires events through these helpers, so a difference between the
two is handled once, here:

* gradio 4 dropped ``.style()``: layout options go to the constructors, and to ``.style()`` only on an old 3.x
  that has no constructor argument for them;
* event listeners take ``_js=`` in 3.x and ``js=`` in 4.x; ``queue()`` takes ``concurrency_count`` in 3.x and
  ``default_concurrency_limit`` in 4.x;
* a Gallery in 4.x refuses file paths outside the working and temp folders, so images are handed over as PIL
  images (both versions accept ``[(image, caption), ...]``);
* a Dropdown in 4.x rejects a value that is not among its choices unless ``allow_custom_value`` is set;
* gradio 4.44 imports ``HfFolder``, which huggingface_hub 1.0 removed: a stand-in is put back before import;
* ``every=`` polling is not used: it needs the queue, runs for every open page whether or not anything trains, and
  went away after 4.x (``gr.Timer``). The page script clicks the tab's Refresh button instead, only while a run is
  active (``javascript/dreambooth.js``).

gradio is imported only when a helper is first called, never when this module is imported.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def gradio() -> Any:
    """The gradio module, imported on first use."""
    _restore_hf_folder()
    import gradio as gr

    log.debug("gradio %s", gr.__version__)
    return gr


def major() -> int:
    return int(str(gradio().__version__).split(".")[0])


def is_gradio4() -> bool:
    return major() >= 4


def _restore_hf_folder() -> None:
    """gradio 4.x does ``from huggingface_hub import HfFolder`` at import; huggingface_hub >= 1.0 has no HfFolder.

    gradio uses it only to read a saved login token (for Hugging Face OAuth, which we never use), so a stand-in that
    answers with huggingface_hub's own ``get_token`` is enough. Nothing is changed when ``HfFolder`` exists.
    """
    try:
        import huggingface_hub
    except ImportError:
        return
    if hasattr(huggingface_hub, "HfFolder"):
        return

    class HfFolder:
        @staticmethod
        def get_token() -> str | None:
            get_token = getattr(huggingface_hub, "get_token", None)
            return get_token() if get_token is not None else os.environ.get("HF_TOKEN")

    huggingface_hub.HfFolder = HfFolder


def _accepted(factory: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``kwargs`` into those ``factory`` accepts and the rest."""
    params = inspect.signature(factory).parameters
    accepted = {k: v for k, v in kwargs.items() if k in params}
    return accepted, {k: v for k, v in kwargs.items() if k not in params}


def make(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """``factory(**kwargs)`` without the keyword arguments this gradio version does not know (they are logged)."""
    accepted, dropped = _accepted(factory, kwargs)
    if dropped:
        log.debug("gradio %s: %s does not take %s", gradio().__version__, getattr(factory, "__name__", factory),
                  ", ".join(dropped))
    return factory(**accepted)


# ------------------------------------------------------------------------------------------------------ components


def blocks(**kwargs: Any) -> Any:
    return make(gradio().Blocks, analytics_enabled=False, **kwargs)


def dropdown(choices: Sequence[str], value: str | None = None, *, custom: bool = True, **kwargs: Any) -> Any:
    """A single-choice dropdown. ``custom`` keeps a value that is not among the choices (a path typed by hand, a
    model deleted meanwhile) instead of failing, as gradio 4 does by default."""
    return make(gradio().Dropdown, choices=list(choices), value=value, allow_custom_value=custom, **kwargs)


def gallery(**kwargs: Any) -> Any:
    """A Gallery; ``columns``/``height``/``object_fit``/``preview`` go to the constructor, or to ``.style()`` on an
    old 3.x that only knows them there."""
    gr = gradio()
    layout = {k: kwargs.pop(k) for k in ("columns", "height", "object_fit", "preview") if k in kwargs}
    accepted, style_only = _accepted(gr.Gallery, layout)
    component = make(gr.Gallery, **kwargs, **accepted)
    if style_only and hasattr(component, "style"):
        if "columns" in style_only:
            style_only["grid"] = style_only.pop("columns")
        component.style(**style_only)
    return component


def gallery_value(items: Sequence[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """A Gallery value from ``(PIL image, caption)`` pairs: the format both versions read.

    PIL images rather than paths, because gradio 4 refuses to serve a path outside its allowed folders, and the
    model dirs live anywhere.
    """
    return [(image, caption) for image, caption in items]


def update(**kwargs: Any) -> Any:
    """A property update for an output component (``gr.update`` exists in 3.x and 4.x)."""
    return gradio().update(**kwargs)


def no_change() -> Any:
    """An output value that leaves the component as it is."""
    return gradio().update()


# ------------------------------------------------------------------------------------------------------ events


def on(event: Callable[..., Any], fn: Callable[..., Any] | None, inputs: Sequence[Any] | None = None,
       outputs: Sequence[Any] | None = None, *, js: str | None = None, queue: bool | None = None,
       show_progress: str = "full") -> Any:
    """Wire ``fn`` to an event listener such as ``button.click``; ``js`` runs in the browser first.

    ``show_progress`` is "full", "minimal" or "hidden" in both versions. The tab's events are not API endpoints
    (``api_name=False``): the HTTP API is ``dreambooth/api.py``. This also keeps gradio 4.44 from describing them,
    which fails with pydantic >= 2.11 for a Gallery (gradio_client cannot read a boolean JSON schema).
    """
    kwargs: dict[str, Any] = {"fn": fn, "inputs": list(inputs or []), "outputs": list(outputs or []),
                              "show_progress": show_progress, "api_name": False}
    if queue is not None:
        kwargs["queue"] = queue
    if js is not None:
        kwargs["js" if "js" in inspect.signature(event).parameters else "_js"] = js
    return event(**kwargs)


def user_input(component: Any) -> Any:
    """The event for a change made by the user (``input``), or ``change`` where the component has no ``input``.

    ``change`` also fires when a handler sets the value, so a Load would trigger it once per control.
    """
    event = getattr(component, "input", None)
    return event if callable(event) else component.change


def queue(demo: Any, concurrency: int = 1) -> Any:
    """Enable the queue: long actions (create, export, samples) run there, one at a time by default."""
    params = inspect.signature(demo.queue).parameters
    if "default_concurrency_limit" in params:
        return demo.queue(default_concurrency_limit=concurrency)
    if "concurrency_count" in params:
        return demo.queue(concurrency_count=concurrency)
    return demo.queue()


def mount(app: Any, demo: Any, path: str = "/") -> Any:
    """Serve ``demo`` from the FastAPI ``app`` at ``path`` (``gr.mount_gradio_app`` in both versions)."""
    return gradio().mount_gradio_app(app, demo, path=path)


def components(demo: Any) -> list[Any]:
    """Every block of a built ``gr.Blocks`` (both versions keep them in ``demo.blocks``, keyed by id)."""
    return list(demo.blocks.values())


def roundtrip(component: Any, value: Any) -> Any:
    """``value`` as it comes back after the server set it in a plain-value control (number, slider, checkbox,
    dropdown, textbox): ``postprocess``, through JSON as the browser sends it, then ``preprocess``.

    Used by the tests to check that a setting survives a trip through a real component of this gradio version.
    """
    return component.preprocess(json.loads(json.dumps(component.postprocess(value))))


def event_functions(demo: Any) -> list[Callable[..., Any]]:
    """The Python functions wired to a built ``gr.Blocks``'s events (a list in 3.x, a dict by id in 4.x)."""
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    return [f.fn for f in fns if f.fn is not None]
