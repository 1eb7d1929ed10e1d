"""`wsi-mil` command line: parses arguments, loads the config, calls a workflow.

Every command takes ``--config FILE`` and ``--set section.key=value`` (repeatable); command-specific
flags are shortcuts for config keys (``--workers 4`` is ``--set compute.workers=4``). Errors in the
user's input print one sentence and exit with code 2.

Exit codes (README, "Exit codes"): 0 all done; 1 the command finished but some slides failed (listed in
``slides.csv`` / ``extract_status.csv`` / ``predictions.csv``) or ``evaluate`` differs from training;
2 bad input, settings or store (one sentence); 3 out of disk space, memory or file handles (one
sentence: what ran out, where, what was kept); 70 a bug in wsi-mil (traceback, the slide named);
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from wsi_mil import __version__
from wsi_mil.config import Config, describe_config, dump_config, load_config
from wsi_mil.errors import ResourceError, WsiMilError, resource_problem
from wsi_mil.redaction import RedactingFormatter, redact
from wsi_mil.workflows.cohort import cli_run
from wsi_mil.workflows.demo import cli_demo
from wsi_mil.workflows.extract import cli_extract
from wsi_mil.workflows.heatmap import cli_heatmap
from wsi_mil.workflows.interop import cli_annotations, cli_export
from wsi_mil.workflows.predict import cli_predict
from wsi_mil.workflows.results import cli_runs
from wsi_mil.workflows.synth import cli_synth
from wsi_mil.workflows.tile import cli_tile
from wsi_mil.workflows.train import cli_evaluate, cli_train
from wsi_mil.workflows.ui import cli_ui

log = logging.getLogger("wsi_mil")

EXIT_OK, EXIT_SLIDES_FAILED, EXIT_INPUT, EXIT_RESOURCE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 70, 130

# flag dest -> config key; a flag left at None does not override the config
FLAG_KEYS: dict[str, str] = {
    "scheduler": "compute.scheduler",
    "workers": "compute.workers",
    "encoder": "features.encoder",
    "weights": "features.weights",
    "batch_size": "features.batch_size",
    "device": "features.device",
    "model": "model.name",
    "tracking_uri": "tracking.uri",
    "labels": "training.labels_csv",
    "epochs": "training.epochs",
    "folds": "training.folds",
    "normalize": "heatmap.normalize",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML experiment config (see configs/).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one config key, e.g. --set training.epochs=20 (repeatable).")


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="Directory for the cohort (slides/, truth/, labels.csv).")
    p.add_argument("--slides", type=int, default=8, help="Number of slides (default: %(default)s).")
    p.add_argument("--seed", type=int, default=0, help="Random seed (same seed, same bytes) (default: %(default)s).")
    p.add_argument("--size", type=int, default=8192, help="Slide width and height in level-0 pixels (default: %(default)s).")
    p.add_argument("--format", choices=["svs", "tiff"], default="svs", help="Aperio SVS or generic pyramidal TIFF (default: %(default)s).")
    p.add_argument("--tumour", choices=["micro", "small", "large", "mixed"], default="small",
                   help="Tumour size on positive slides (default: %(default)s).")
    p.add_argument("--positive-fraction", type=float, default=0.5, help="Share of positive slides (default: %(default)s).")
    p.add_argument("--artefacts", action="store_true", help="Add pen marks, blur and folds to some slides.")
    p.add_argument("--mpp", type=float, default=0.25, help="Level-0 microns per pixel (default: %(default)s).")


def _add_tile(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides_dir", type=Path, help="Directory of whole-slide images.")
    p.add_argument("--out", type=Path, required=True, help="Output directory.")
    p.add_argument("--scheduler", help="Address of an existing Dask scheduler (tcp://HOST:PORT).")
    p.add_argument("--workers", type=int, help="Local Dask workers.")
    p.add_argument("--strict", action="store_true", help="Stop at the first failed slide.")


def _add_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="Output directory of `wsi-mil tile`.")
    p.add_argument("--encoder", help="Encoder name (resnet50_trunc, any timm name, hf-hub:...).")
    p.add_argument("--weights", help="pretrained | random | path to a local weights file.")
    p.add_argument("--batch-size", type=int, help="Patches per forward pass.")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="Compute device.")
    p.add_argument("--scheduler", help="Spread slides over an existing Dask cluster (tcp://HOST:PORT).")
    p.add_argument("--strict", action="store_true", help="Stop at the first failed slide.")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="Output directory holding features/.")
    p.add_argument("--labels", type=Path, help="CSV with slide_id,label[,patient_id][,split].")
    p.add_argument("--model", help="mean | max | abmil | gated_abmil | transmil | dsmil | mhim | ins.")
    p.add_argument("--encoder", help="Encoder the bags were made with (as for `extract`; picks the features folder).")
    p.add_argument("--weights", help="Weights the bags were made with: pretrained | random | path (as for `extract`).")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite inside OUT).")
    p.add_argument("--scheduler", help="Train each (seed, fold) as a task on an existing Dask cluster (tcp://HOST:PORT).")
    p.add_argument("--epochs", type=int, help="Maximum epochs.")
    p.add_argument("--folds", type=int, help="Cross-validation folds.")
    p.add_argument("--force", action="store_true",
                   help="Train again although a finished run with the same settings, labels and bags exists.")


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="MLflow run id of a `wsi-mil train` parent run.")
    p.add_argument("--out", type=Path, default=Path("."), help="Output directory of that run.")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite inside OUT).")


def _add_heatmap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="MLflow run id (a `train` parent run or one fold's run).")
    p.add_argument("--out", type=Path, default=Path("."), help="Output directory of that run.")
    p.add_argument("--slides", nargs="*", help="Slide ids (default: each fold's test slides).")
    p.add_argument("--normalize", choices=["auto", "absolute", "cohort", "raw", "rank", "percentile"],
                   help="Score scale (auto: absolute 0-1 for instance probabilities, one cohort scale for attention).")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite inside OUT).")
    p.add_argument("--slides-dir", type=Path, help="Folder the slides moved to (found there by slide id).")


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides_dir", type=Path, nargs="?", help="Directory of new slides.")
    p.add_argument("--slides-dir", dest="slides_dir_option", type=Path, help="Directory of new slides (same as SLIDES_DIR).")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", help="MLflow run id of a `wsi-mil train` parent run.")
    model.add_argument("--model", dest="model_uri", metavar="URI",
                       help="MLflow model: models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/model.")
    p.add_argument("--out", type=Path, default=Path("."), help="Output directory of that run.")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite inside OUT).")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides_dir", type=Path, help="Directory of whole-slide images.")
    p.add_argument("--labels", type=Path, required=True, help="CSV with slide_id,label[,patient_id].")
    p.add_argument("--out", type=Path, required=True, help="Output directory.")
    p.add_argument("--scheduler", help="Address of an existing Dask scheduler (tcp://HOST:PORT).")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite inside OUT).")
    p.add_argument("--weights", help="pretrained | random | path to a local weights file.")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("wsi-mil-demo"), help="Output directory.")
    p.add_argument("--slides", type=int, default=12, help="Synthetic slides.")
    p.add_argument("--weights", help="pretrained | random | path (default: pretrained when available).")


def _add_runs(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="Output directory whose MLflow store to read.")
    p.add_argument("--experiment", help="Only this MLflow experiment (default: every experiment).")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite inside OUT).")


def _add_ui(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="Output directory whose MLflow store to open.")
    p.add_argument("--port", type=int, default=5000, help="Port to listen on.")
    p.add_argument("--host", default="127.0.0.1",
                   help="Interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the UI, "
                        "without authentication, to the network).")


def _add_annotations(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="QuPath GeoJSON export or ASAP XML file.")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--slide", type=Path, help="The annotated slide (its MPP gives areas in um^2).")
    scale.add_argument("--mpp", type=float, help="Level-0 um/px of the annotated slide (areas in um^2).")
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("tool", choices=["clam", "trident"], help="Folder layout to write.")
    p.add_argument("out", type=Path, help="Output directory of `wsi-mil extract`.")
    p.add_argument("--to", type=Path, help="Export folder (default OUT/export/<tool>).")
    p.add_argument("--encoder-name", help="trident: name of the features_<name> folder (default: the encoder key).")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show"], help="show: print the resolved config.")
    p.add_argument("--describe", action="store_true",
                   help="Every key with its value, default, allowed values and meaning; the registered models.")


def cli_config(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil config show [--describe]`: print the resolved config as YAML (credentials masked), or every key described."""
    sys.stdout.write(redact(describe_config(cfg) if getattr(args, "describe", False) else dump_config(cfg)))
    return 0


Handler = Callable[[argparse.Namespace, Config], int]

# name -> (help, argument builder, handler taking (args, cfg) and returning an exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "synth": ("Generate a synthetic slide cohort with ground truth.", _add_synth, cli_synth),
    "tile": ("Find tissue and tile a slide directory into Zarr patch stores.", _add_tile, cli_tile),
    "extract": ("Embed patch stores into per-slide HDF5 feature bags.", _add_extract, cli_extract),
    "train": ("Cross-validate a MIL model on feature bags; log to MLflow.", _add_train, cli_train),
    "evaluate": ("Re-score a trained run's checkpoints on their test folds.", _add_evaluate, cli_evaluate),
    "heatmap": ("Draw per-slide heatmaps from a trained run.", _add_heatmap, cli_heatmap),
    "predict": ("Predict new slides with a trained run or a registered model.", _add_predict, cli_predict),
    "run": ("Whole workflow: tile, extract, train, evaluate, heatmaps.", _add_run, cli_run),
    "demo": ("Synthesise a cohort and run the whole workflow offline.", _add_demo, cli_demo),
    "runs": ("List the trained models: name, when, settings digest, test AUC, run id.", _add_runs, cli_runs),
    "ui": ("Open the MLflow UI over an output directory.", _add_ui, cli_ui),
    "annotations": ("Show what an annotation file holds: areas per class and role, ignored objects.",
                    _add_annotations, cli_annotations),
    "export": ("Link bags into the folder layout CLAM or TRIDENT reads.", _add_export, cli_export),
    "config": ("Print the resolved configuration.", _add_config, cli_config),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="wsi-mil", description="Whole-slide images to cross-validated MIL models, tracked in MLflow.",
        epilog="Start with `wsi-mil demo`; every command takes --config FILE and --set section.key=value.")
    parser.add_argument("--version", action="version", version=f"wsi-mil {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="More log output (-vv: debug).")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        _common(p)
    return parser


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Plain, timestamped log lines on stderr, credentials masked (:func:`wsi_mil.redaction.redact`)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])  # a no-op when logging is configured already
    for noisy in ("distributed", "mlflow", "alembic", "urllib3", "matplotlib", "PIL", "numcodecs", "h5py"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def config_from_args(args: argparse.Namespace) -> Config:
    """Load --config, then apply flag shortcuts and --set overrides (later wins)."""
    overrides: list[str] = []
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    overrides.extend(getattr(args, "overrides", []) or [])
    return load_config(getattr(args, "config", None), overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `wsi-mil` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        cfg = config_from_args(args)
        return int(COMMANDS[args.command][2](args, cfg) or 0)
    except ResourceError as exc:
        print(f"wsi-mil {args.command}: error: {redact(exc)}", file=sys.stderr)
        return EXIT_RESOURCE
    except WsiMilError as exc:
        print(f"wsi-mil {args.command}: error: {redact(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"wsi-mil {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        what = resource_problem(exc)
        if what is not None:  # out of disk/memory/files outside the places that name their path
            print(f"wsi-mil {args.command}: error: {what} ({redact(_first_line(exc))}); outputs finished so far are "
                  "kept; free some and rerun the same command to resume.", file=sys.stderr)
            return EXIT_RESOURCE
        traceback.print_exc()
        print(f"wsi-mil {args.command}: internal error ({type(exc).__name__}); this is a bug in wsi-mil, not a "
              "problem with your input: please report it with the traceback above.", file=sys.stderr)
        return EXIT_BUG


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
