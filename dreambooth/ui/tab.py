"""The Dreambooth tab: ``build_tab(host)`` lays it out and wires each control to :mod:`.handlers`.

The settings controls are generated from the config's field specs (``form.py``): one control per setting, grouped
by the setting's group, labelled and explained by its spec. The output panel is rendered from the model dir
(``output.py``); the page script (``javascript/dreambooth.js``) clicks the Refresh button about once a second while
a run is active. gradio is reached only through ``compat``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from .. import gpus
from ..config import TrainConfig
from ..families import FAMILY_IDS
from . import compat
from .form import CONCEPT_GROUPS, CONCEPT_PANELS, SETTING_GROUPS, Control, shown_for_method
from .handlers import LOG_LINES, NO_PROFILE, PROFILE_CHOICES, Host, TabHandlers, guarded, steps_html
from .output import loss_svg, message_html, status_html

log = logging.getLogger(__name__)

MODEL_TYPES = ("auto", *FAMILY_IDS)
GALLERY_HEIGHT = 320
REFRESH_SYMBOL = "\u21bb"  # the clockwise arrow, in fonts that have no emoji
TAB_ID = "dreambooth_tab"

__all__ = ["Host", "TabHandlers", "build_tab"]


# ---------------------------------------------------------------------------------------------------- layout


def _component(control: Control, visible: bool = True) -> Any:
    """The one control for one setting, from its spec: label, help, default, range, choices."""
    gr = compat.gradio()
    spec = control.spec
    common = {"label": spec.label, "info": spec.help or None, "elem_id": control.elem_id, "value": spec.default,
              "visible": visible}
    kind = control.kind
    if kind == "checkbox":
        return compat.make(gr.Checkbox, **common)
    if kind == "dropdown":
        return compat.dropdown(spec.choices or (), spec.default, custom=False, label=spec.label,
                               info=spec.help or None, elem_id=control.elem_id, visible=visible)
    if kind == "slider":
        return compat.make(gr.Slider, minimum=spec.minimum, maximum=spec.maximum, step=1, **common)
    if kind == "gpus":  # this machine's GPUs, numbered as torch numbers them here
        machine = gpus.machine_gpus()
        info = spec.help if machine else f"{spec.help} (No CUDA GPU found here: training runs on the CPU.)"
        return compat.make(gr.CheckboxGroup, choices=machine, **{**common, "value": [], "info": info})
    if kind == "number":
        return compat.make(gr.Number, precision=0 if spec.type is int else None, minimum=spec.minimum,
                           maximum=spec.maximum, **common)
    return compat.make(gr.Textbox, lines=1, max_lines=1, **common)


def _group_controls(controls: list[Control], groups: dict[str, str]) -> dict[str, list[Control]]:
    """Controls by group, known groups in their order first, then any new group the config adds."""
    grouped: dict[str, list[Control]] = {g: [] for g in groups}
    for control in controls:
        grouped.setdefault(control.spec.group, []).append(control)
    return {g: cs for g, cs in grouped.items() if cs}


def build_tab(host: Host) -> Any:
    """The Dreambooth tab as a ``gr.Blocks``, for the WebUI's ``on_ui_tabs`` or the standalone app."""
    gr = compat.gradio()
    handlers = TabHandlers(host, no_change=compat.no_change)
    made: dict[str, Any] = {}  # elem_id -> component, in the order of handlers.controls

    default = TrainConfig()  # the form starts with the defaults: their method's and optimizer's settings show

    def shown(controls: list[Control]) -> list[bool]:
        return shown_for_method(default.method, controls, default.optimizer, dataclasses.asdict(default))

    def render(controls: list[Control]) -> None:
        for control, visible in zip(controls, shown(controls), strict=True):
            made[control.elem_id] = _component(control, visible)

    config_controls = [c for c in handlers.controls if c.concept is None]
    with compat.blocks(title="Dreambooth") as demo, gr.Column(elem_id=TAB_ID):
        # top bar
        with gr.Row(elem_id="dreambooth_topbar"):
            model = compat.dropdown(handlers.model_choices(), None, custom=True, label="Model",
                                    elem_id="dreambooth_model", scale=3)
            refresh_models = compat.make(gr.Button, value=REFRESH_SYMBOL, elem_id="dreambooth_refresh_models",
                                         size="sm", scale=0, min_width=40)
            load = compat.make(gr.Button, value="Load", elem_id="dreambooth_load", scale=1, min_width=60)
            save = compat.make(gr.Button, value="Save", elem_id="dreambooth_save", scale=1, min_width=60)
            train = compat.make(gr.Button, value="Train", variant="primary", elem_id="dreambooth_train", scale=1,
                                min_width=60)
            cancel = compat.make(gr.Button, value="Cancel", variant="stop", elem_id="dreambooth_cancel", scale=1,
                                 min_width=60)
            pause = compat.make(gr.Button, value="Pause", elem_id="dreambooth_pause", scale=1, min_width=60)
            export = compat.make(gr.Button, value="Export now", elem_id="dreambooth_export", scale=1, min_width=80)
            sample = compat.make(gr.Button, value="Generate samples now", elem_id="dreambooth_sample", scale=1,
                                 min_width=100)
        with gr.Row():
            message = compat.make(gr.HTML, value=message_html(""), elem_id="dreambooth_message")
            resume = compat.make(gr.Checkbox, value=False, label="Continue from the last resume state",
                                 elem_id="dreambooth_resume", scale=0, min_width=220)
        steps_line = compat.make(gr.HTML, value=steps_html("0 steps: no instance images found yet"),
                                 elem_id="dreambooth_steps")

        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Tabs(elem_id="dreambooth_sections"):
                    with gr.Tab("Model", id="dreambooth_model_tab", elem_id="dreambooth_model_tab"):
                        info = compat.make(gr.HTML, value="", elem_id="dreambooth_model_info")
                        with gr.Row():
                            source = compat.dropdown(handlers.checkpoint_choices(), host.loaded_checkpoint(),
                                                     custom=True, label="Source checkpoint",
                                                     elem_id="dreambooth_source", scale=3)
                            refresh_sources = compat.make(gr.Button, value=REFRESH_SYMBOL, size="sm", scale=0,
                                                          min_width=40, elem_id="dreambooth_refresh_sources")
                        with gr.Row():
                            model_type = compat.dropdown(MODEL_TYPES, "auto", custom=False, label="Model type",
                                                         info="auto detects SD 1.x / 2.x / 2.x 768-v / SDXL",
                                                         elem_id="dreambooth_model_type")
                            extract_ema = compat.make(gr.Checkbox, value=False, label="Extract EMA weights",
                                                      info="Use the checkpoint's EMA UNet",
                                                      elem_id="dreambooth_extract_ema")
                        new_name = compat.make(gr.Textbox, label="Name", placeholder="my-dog-v1", lines=1,
                                               max_lines=1, elem_id="dreambooth_new_name")
                        create = compat.make(gr.Button, value="Create model", variant="primary",
                                             elem_id="dreambooth_create")
                    with gr.Tab("Settings", id="dreambooth_settings_tab", elem_id="dreambooth_settings_tab"):
                        with gr.Row():
                            profile = compat.dropdown(list(PROFILE_CHOICES), NO_PROFILE, custom=False,
                                                      label="Memory profile",
                                                      info="sets the memory and speed settings below; the memory "
                                                           "shown is an estimate",
                                                      elem_id="dreambooth_memory_profile")
                            memory_line = compat.make(gr.HTML, value="", elem_id="dreambooth_memory")
                        grouped = _group_controls([c for c in config_controls if c.spec.group != "concepts"],
                                                  SETTING_GROUPS)
                        groups: dict[str, Any] = {}
                        for group, controls in grouped.items():
                            # a group whose every setting belongs to other methods (LoRA) starts hidden
                            hidden = not any(shown(controls))
                            with gr.Accordion(SETTING_GROUPS.get(group, group.replace("_", " ").capitalize()),
                                              open=group in ("method", "intervals", "lora"),
                                              visible=not hidden, elem_id=f"dbt_group_{group}") as accordion:
                                groups[group] = (accordion, controls)
                                render(controls)
                    with gr.Tab("Concepts", id="dreambooth_concepts_tab", elem_id="dreambooth_concepts_tab"):
                        render([c for c in config_controls if c.spec.group == "concepts"])
                        with gr.Accordion("Import kohya dataset", open=False, elem_id="dreambooth_kohya"):
                            with gr.Row():
                                kohya_source = compat.make(
                                    gr.Textbox, label="Dataset .toml or folder of <repeats>_<name> folders",
                                    lines=1, max_lines=1, elem_id="dreambooth_kohya_source", scale=3)
                                kohya_reg = compat.make(gr.Textbox, label="Regularization folder (with a folder)",
                                                        lines=1, max_lines=1, elem_id="dreambooth_kohya_reg", scale=2)
                                kohya_import = compat.make(gr.Button, value="Import", elem_id="dreambooth_kohya_import",
                                                           scale=0, min_width=100)
                        with gr.Tabs():
                            for index in range(CONCEPT_PANELS):
                                with gr.Tab(f"Concept {index + 1}", id=f"dreambooth_concept_{index}",
                                            elem_id=f"dreambooth_concept_{index}"):
                                    panel = [c for c in handlers.controls if c.concept == index]
                                    for group, controls in _group_controls(panel, CONCEPT_GROUPS).items():
                                        if group == "instance":
                                            render(controls)
                                            continue
                                        with gr.Accordion(CONCEPT_GROUPS.get(group, group), open=False,
                                                          elem_id=f"dbt_c{index}_group_{group}"):
                                            render(controls)
            with gr.Column(scale=2, elem_id="dreambooth_output"):
                status = compat.make(gr.HTML, value=status_html(None, False, None), elem_id="dreambooth_status")
                poll = compat.make(gr.Button, value="Refresh", size="sm", elem_id="dreambooth_poll")
                loss = compat.make(gr.HTML, value=loss_svg([]), elem_id="dreambooth_loss")
                gallery = compat.gallery(label="Newest previews", elem_id="dreambooth_gallery", columns=4,
                                         height=GALLERY_HEIGHT, object_fit="contain", show_label=True)
                # newest line at the bottom, in view: gradio 4 scrolls there itself, the page script does in 3.x
                worker_log = compat.make(gr.Textbox, label="Worker log", lines=LOG_LINES, max_lines=LOG_LINES,
                                         interactive=False, autoscroll=True, show_copy_button=True,
                                         elem_id="dreambooth_log")
        seen = gr.State({})
        form_method = gr.State(default.method)  # the method whose defaults the form's untouched settings show

        values = [made[c.elem_id] for c in handlers.controls]
        guard = functools.partial(guarded, no_change=compat.no_change)
        poll_outputs = [status, loss, gallery, worker_log, pause, seen]
        form_outputs = [message, info, steps_line, *values, form_method]
        method_at = [c.elem_id for c in handlers.controls].index("dbt_method") - len(values)

        def filling(fn: Any) -> Any:
            """``fn`` fills the form (its outputs end with the values); also set ``form_method`` to the method shown."""

            @functools.wraps(fn)
            def fill(*args: Any) -> list[Any]:
                out = fn(*args)
                return [*out, out[method_at]]

            return fill

        def then_poll(dependency: Any) -> None:
            compat.on(dependency.then, handlers.poll, [model, seen], poll_outputs, queue=False,
                      show_progress="hidden")

        compat.on(refresh_models.click, guard(1)(handlers.refresh_models), [model], [model], queue=False)
        compat.on(refresh_sources.click, guard(1)(handlers.refresh_checkpoints), [source], [source], queue=False)
        # the lists are filled when the tab is built (in the WebUI: once, at start): each page load reads them again.
        # gradio fires load events once the page takes events; a click on Refresh from the page script could come
        # before that and be lost (the list then lacked a model made since the start: CI16)
        compat.on(demo.load, guard(1)(handlers.refresh_models), [model], [model], queue=False)
        compat.on(demo.load, guard(1)(handlers.refresh_checkpoints), [source], [source], queue=False)
        then_poll(compat.on(model.select, guard(len(form_outputs))(filling(handlers.load)), [model], form_outputs,
                            queue=False))
        then_poll(compat.on(load.click, guard(len(form_outputs))(filling(handlers.load)), [model], form_outputs,
                            queue=False))
        compat.on(save.click, guard(1)(handlers.save), [model, *values], [message], queue=False)
        compat.on(kohya_import.click, guard(len(form_outputs))(filling(handlers.import_kohya)),
                  [model, kohya_source, kohya_reg], form_outputs, queue=False)
        then_poll(compat.on(create.click, guard(len(form_outputs) + 1)(filling(handlers.create)),
                            [source, model_type, extract_ema, new_name],
                            [message, info, steps_line, model, *values, form_method]))
        compat.on(train.click, guard(2)(handlers.train), [model, resume, *values], [message, status], queue=False)
        compat.on(cancel.click, guard(1)(handlers.cancel), [model], [message], queue=False)
        compat.on(pause.click, guard(2)(handlers.pause), [model], [message, pause], queue=False)
        compat.on(export.click, guard(1)(handlers.export), [model, *values], [message])
        then_poll(compat.on(sample.click, guard(1)(handlers.sample), [model, *values], [message]))
        compat.on(poll.click, guard(len(poll_outputs))(handlers.poll), [model, seen], poll_outputs, queue=False,
                  show_progress="hidden")

        # settings that do not apply to the chosen training method, optimizer, the model's prediction type or other
        # choices (FieldSpec.requires: the LoKr settings to LoRA type lokr) are hidden, whole groups too
        def depends(control: Control) -> bool:
            spec = control.spec
            return any(x is not None for x in (spec.methods, spec.optimizers, spec.predictions, spec.requires))

        required = sorted({c.spec.requires[0] for c in config_controls if c.spec.requires})

        dependent = [c for c in config_controls if depends(c)]
        dependent_groups = [(accordion, controls) for accordion, controls in groups.values()
                            if all(depends(c) for c in controls)]

        def show_for(method: str, optimizer: str, name: str | None, *others: Any) -> list[Any]:
            prediction = handlers.prediction_type(name)
            values = dict(zip(required, others, strict=True))
            shown = lambda cs: shown_for_method(method, cs, optimizer, values, prediction)  # noqa: E731
            updates = [compat.update(visible=v) for v in shown(dependent)]
            return updates + [compat.update(visible=any(shown(cs))) for _, cs in dependent_groups]

        choice = [made["dbt_method"], made["dbt_optimizer"], model, *(made[f"dbt_{name}"] for name in required)]
        for trigger in choice:
            compat.on(trigger.change, show_for, choice,
                      [made[c.elem_id] for c in dependent] + [a for a, _ in dependent_groups], queue=False)
        # a method picked by the user: the settings still at the previous method's defaults show the new method's
        compat.on(compat.user_input(made["dbt_method"]), guard(2 + len(values))(handlers.choose_method),
                  [form_method, *values], [message, *values, form_method], queue=False)

        compat.on(profile.change, guard(1 + len(values))(handlers.apply_profile), [model, profile, *values],
                  [memory_line, *values], queue=False)

        step_inputs = [made["dbt_epochs"], made["dbt_train_batch_size"], made["dbt_gradient_accumulation_steps"],
                       made["dbt_concepts_list_file"]]
        for index in range(CONCEPT_PANELS):
            step_inputs += [made[f"dbt_c{index}_{n}"] for n in ("instance_data_dir", "repeats", "num_class_images_per")]
        for component in step_inputs:
            compat.on(compat.user_input(component), guard(1)(handlers.steps), step_inputs, [steps_line], queue=False,
                      show_progress="hidden")
    demo.dreambooth_handlers = handlers  # for tests and hosts that want the plain handlers
    return demo
