"""``python -m dreambooth``: create, export, info and demo from the command line.

Errors print as one line plus a hint; ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from . import __version__
from .config import ATTENTION_MODES, EMA_EXPORTS, FILE_DTYPES
from .errors import UserError
from .families import FAMILY_IDS
from .profiles import PROFILES
from .ui.app import add_ui_command, cmd_ui

log = logging.getLogger(__name__)


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-root", metavar="DIR",
                   help="models root (default: $DREAMBOOTH_MODELS_ROOT or ./models); model dirs live in "
                        "DIR/dreambooth/<name>")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreambooth", description="DreamBooth trainer for Stable "
                                     "Diffusion 1.x, 2.x and SDXL; the engine of the WebUI extension.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("create", help="create a trainable model from a checkpoint file or diffusers folder",
                       description="Create <models root>/dreambooth/<name>/ from a .safetensors/.ckpt checkpoint "
                                   "or a diffusers folder. The family is detected; SD 2.x v-prediction is read "
                                   "from a .yaml of the same name beside the file, or given with --family sd2v.")
    p.add_argument("source", help="checkpoint file (.safetensors, .ckpt) or diffusers folder")
    p.add_argument("name", help="name of the new model (one safe folder name)")
    p.add_argument("--family", choices=FAMILY_IDS, help="override the detected model type")
    p.add_argument("--extract-ema", action="store_true", help="use the file's EMA UNet weights")
    p.add_argument("--dtype", choices=FILE_DTYPES, default="keep",
                   help="precision of the working copy (default: as in the source)")
    _add_root(p)

    p = sub.add_parser("export", help="export a model to a single-file .safetensors the WebUI loads",
                       description="Write the model's working weights as a single-file checkpoint with the "
                                   "original key names, metadata, and a .yaml beside SD 2.x v-prediction files.")
    p.add_argument("name", help="model name")
    p.add_argument("--dest", help="output .safetensors file or folder (default: <models root>/Stable-diffusion)")
    p.add_argument("--dtype", choices=FILE_DTYPES, default="fp16",
                   help="precision of the file (default fp16)")
    p.add_argument("--ema", choices=EMA_EXPORTS, default="none",
                   help="none: no EMA; main: EMA weights as the UNet; both: training layout with model_ema.*")
    _add_root(p)

    p = sub.add_parser("info", help="describe a checkpoint file, diffusers folder or model",
                       description="Family, parameter counts, dtypes, EMA and a key summary.")
    p.add_argument("target", help="checkpoint file, diffusers folder, or model name")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_root(p)

    p = sub.add_parser("train", help="train a model with its db_config.json (in this process: the worker)",
                       description="Trains the model dir's working/ weights with its db_config.json, reporting "
                                   "through status.json and logs/. Cancel with Ctrl-C, SIGTERM or "
                                   "`python -m dreambooth cancel NAME`; checkpoints go to <models root>/"
                                   "Stable-diffusion unless --export-dir says otherwise.")
    p.add_argument("name", help="model name")
    p.add_argument("--resume", action="store_true", help="continue from the newest resume state")
    p.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--processes", type=int, metavar="N",
                   help="train data-parallel in N processes: one per GPU (the first N, or those of --gpus / the "
                        "GPUs setting), or N on the CPU with --device cpu; the global batch is batch size x N")
    p.add_argument("--gpus", metavar="LIST", help="the GPUs to train on, e.g. 0,1 (instead of the GPUs setting)")
    p.add_argument("--export-dir", help="where checkpoints are exported at each save")
    p.add_argument("--lora-dir", help="where LoRA files are exported at each save (default: <models root>/Lora)")
    p.add_argument("--embeddings-dir",
                   help="where embeddings are exported at each save (default: <models root>/embeddings)")
    p.add_argument("--hypernetworks-dir",
                   help="where hypernetworks are exported at each save (default: <models root>/hypernetworks)")
    p.add_argument("--attention-default", choices=ATTENTION_MODES, default="sdp",
                   help="what the config's attention 'auto' means (the WebUI passes its own choice)")
    p.add_argument("--cpu-fp16", action="store_true",
                   help="with mixed precision fp16 on the CPU, run the GPU's fp16 path (autocast + grad scaler; "
                        "torch 2.3+) instead of fp32")
    p.add_argument("--profile", choices=tuple(PROFILES),
                   help="apply a memory profile to the model's db_config.json before training (see profiles.py)")
    _add_root(p)

    p = sub.add_parser("sample", help="make previews of a model's working weights now (in this process: the worker)",
                       description="Previews for each concept with the saved db_config.json, as the trainer makes "
                                   "them (scheduler, clip skip, attention, mixed precision), into the model's "
                                   "samples/; reports through status.json. The tab's 'Generate samples now'.")
    p.add_argument("name", help="model name")
    p.add_argument("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--attention-default", choices=ATTENTION_MODES, default="sdp",
                   help="what the config's attention 'auto' means (the WebUI passes its own choice)")
    _add_root(p)

    p = sub.add_parser("import-kohya", help="fill a model's concepts from a kohya dataset (TOML or folders)",
                       description="Replace the model's concepts with a kohya sd-scripts dataset: a dataset .toml "
                                   "([general], [[datasets]], [[datasets.subsets]]) or a folder of "
                                   "<repeats>_<name> folders; the settings it sets (resolution, buckets, batch "
                                   "size, ...) are applied too. Prints what was imported and the total steps.")
    p.add_argument("name", help="model name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--toml", metavar="FILE", help="kohya dataset config (.toml)")
    source.add_argument("--folder", metavar="DIR", help="folder of <repeats>_<name> folders (kohya's train_data_dir)")
    p.add_argument("--reg-folder", metavar="DIR",
                   help="with --folder: folder of <repeats>_<class> folders of class images (kohya's reg_data_dir)")
    _add_root(p)

    for command, text in (("cancel", "ask a running training to stop at the next step (it saves if set to)"),
                          ("pause", "ask a running training to pause at the next step"),
                          ("unpause", "let a paused training go on"),
                          ("status", "print a model's training status")):
        p = sub.add_parser(command, help=text, description=text)
        p.add_argument("name", help="model name")
        _add_root(p)

    add_ui_command(sub)

    p = sub.add_parser("demo", help="build a tiny model and a synthetic concept and run everything end to end",
                       description="Runs on a CPU in seconds without any download.")
    p.add_argument("--out", default="demo_output", help="folder for the demo's files (default: ./demo_output)")
    p.add_argument("--family", choices=FAMILY_IDS, default="sd1")
    return parser


def _print_info(info: dict[str, Any]) -> None:
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in value.items())
        print(f"{key.ljust(width)}  {value}")


def cmd_create(args: argparse.Namespace) -> int:
    from .create import create_model

    md = create_model(args.source, args.name, args.models_root, family=args.family, extract_ema=args.extract_ema,
                      dtype=args.dtype)
    print(f"created {md.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint
    from .store import models_root, open_model

    md = open_model(args.name, args.models_root)
    dest = args.dest or models_root(args.models_root) / "Stable-diffusion"
    path = export_checkpoint(md, dest, dtype=args.dtype, ema=args.ema)
    print(f"exported {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .errors import CheckpointError
    from .inspect_model import describe_checkpoint, describe_folder, describe_model
    from .store import open_model

    target = Path(args.target)
    if target.is_file():
        info = describe_checkpoint(target)
    elif target.is_dir():
        info = describe_folder(target)
    elif "/" in args.target or "\\" in args.target or target.suffix in (".safetensors", ".ckpt"):
        raise CheckpointError(f"{target} does not exist", "check the path")
    else:
        info = describe_model(open_model(args.target, args.models_root))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .store import models_root, open_model

    md = open_model(args.name, args.models_root)
    if getattr(args, "profile", None) and not _rank():
        from .config import load_config
        from .profiles import apply_profile

        apply_profile(load_config(md.path), args.profile).save(md.path)
        print(f"applied the memory profile {args.profile!r} to {md.config_path}")
    export_dir = Path(args.export_dir) if args.export_dir else models_root(args.models_root) / "Stable-diffusion"
    root = models_root(args.models_root)
    lora_dir = Path(args.lora_dir) if args.lora_dir else root / "Lora"
    embeddings_dir = Path(args.embeddings_dir) if args.embeddings_dir else root / "embeddings"
    hypernetworks_dir = Path(args.hypernetworks_dir) if args.hypernetworks_dir else root / "hypernetworks"
    device = args.device
    if _rank() is None:  # not one of several processes already: how many this run takes
        from .config import load_config
        from .gpus import plan

        run_plan = plan(load_config(md.path), args.device, args.processes, args.gpus)
        if run_plan.processes > 1:
            from .train.launch import run

            dirs = {"--export-dir": export_dir, "--lora-dir": lora_dir, "--embeddings-dir": embeddings_dir,
                    "--hypernetworks-dir": hypernetworks_dir}
            worker = [*(["--debug"] if args.debug else []), "train", md.name, "--models-root", str(root),
                      "--attention-default", args.attention_default, *[a for k, v in dirs.items() for a in (k, str(v))],
                      *(["--resume"] if args.resume else []), *(["--cpu-fp16"] if args.cpu_fp16 else []),
                      *(["--device", "cpu"] if run_plan.device == "cpu" else [])]
            return run(md, run_plan, worker)  # the same command in each process (rank 0 writes)
        device = run_plan.device
    from .train.loop import RunOptions, train_model  # after the launch: the launcher needs no diffusers

    status = train_model(md, RunOptions(device=device, resume=args.resume, export_dir=export_dir,
                                        lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                                        hypernetworks_dir=hypernetworks_dir,
                                        attention_default=args.attention_default, cpu_fp16=args.cpu_fp16))
    if not _rank():  # rank 0 reports the run; the others say nothing
        print(f"{status['state']}: {status.get('message', '')} (step {status.get('step')})")
    return 0 if status["state"] in ("done", "cancelled") else 1


def _rank() -> int | None:
    """This process's rank when torch's launcher started it as one of several (``$WORLD_SIZE`` above 1), else None."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample_job import run_sample_job
    from .store import open_model

    status = run_sample_job(open_model(args.name, args.models_root), args.device, args.attention_default)
    print(f"{status['state']}: {status['message']}")
    return 0 if status["state"] in ("done", "cancelled") else 1


def cmd_import_kohya(args: argparse.Namespace) -> int:
    from .data.kohya import import_kohya
    from .store import open_model

    if args.reg_folder and not args.folder:
        raise UserError("--reg-folder goes with --folder", "put the reg subsets (is_reg = true) into the TOML")
    result = import_kohya(open_model(args.name, args.models_root), args.toml or args.folder, args.reg_folder)
    for note in result.notes:
        print(f"note: {note}")
    print(result.summary())
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from .store import open_model
    from .train import status as st

    md = open_model(args.name, args.models_root)
    if args.command == "status":
        current = st.read_status(md)
        print(json.dumps(current, indent=2) if current else f"{args.name} has not been trained yet")
        return 0
    {"cancel": st.request_cancel, "pause": st.request_pause, "unpause": st.request_unpause}[args.command](md)
    print(f"{args.command} requested for {args.name}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), args.family)
    return 0


COMMANDS = {"create": cmd_create, "export": cmd_export, "info": cmd_info, "train": cmd_train, "cancel": cmd_control,
            "pause": cmd_control, "unpause": cmd_control, "status": cmd_control, "demo": cmd_demo, "ui": cmd_ui,
            "import-kohya": cmd_import_kohya, "sample": cmd_sample}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = _rank()
    quiet = bool(rank)  # a process other than rank 0 of a data-parallel run: rank 0 reports, it only warns
    prefix = f"[process {rank + 1}] " if quiet else ""
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING if quiet else logging.INFO,
                        format=f"{prefix}%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        if quiet:
            return 2  # rank 0 has the run's message (this process's own included)
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            traceback.print_exc()
        print(f"error: unexpected {type(err).__name__}: {err}", file=sys.stderr)
        print("hint: run again with --debug for the traceback, and report it if it looks like a bug",
              file=sys.stderr)
        return 1
