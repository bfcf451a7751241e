"""Build RML-LAMA records from the real sources: ``python -m knlight.data.build <source> [options]``.

One subcommand per source (``mpararel``, ``rml_precursor``, ``pararel``, ``mlama``); ``--help`` after a
subcommand lists its options. Lists are written ``--languages [en,de,ja]`` or ``--languages en,de,ja``.
Example::

    python -m knlight.data.build mpararel --root ../shared/data/mpararel \\
        --languages [en,zh-hans,fr,de,es,ru,ja,ko] --output data/rml_mpararel.jsonl
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from knlight.data.assemble import assemble_records
from knlight.data.lama import read_mlama, read_pararel
from knlight.data.pipeline import BuildOptions, BuildReport, Draft
from knlight.data.precursor import read_rml_precursor
from knlight.data.records import FactRecord, write_records
from knlight.data.sources import read_mpararel
from knlight.errors import DataError

logger = logging.getLogger(__name__)

Reader = Callable[[BuildOptions, BuildReport], tuple[list[Draft], list[str]]]


def build_records(
    source: str, root: str | Path, reader: Reader, options: BuildOptions, extra_options: dict[str, Any]
) -> tuple[list[FactRecord], dict[str, Any]]:
    """Runs a source reader and the shared build steps.

    Args:
        source: Source name for the manifest.
        root: Source folder, recorded in the manifest as given.
        reader: Reads the source into drafts.
        options: The shared options.
        extra_options: Source-specific options, recorded in the manifest.

    Returns:
        The records and the manifest (without counts; :func:`write_records` adds them).
    """
    started = time.perf_counter()
    report = BuildReport()
    drafts, languages = reader(options, report)
    records = assemble_records(drafts, languages, options, report)
    manifest = {
        "source": source,
        "root": str(root),
        "options": {**options.to_manifest(), **extra_options},
        "languages": languages,
        "report": report.to_manifest(),
    }
    logger.info("built %d records from %s in %.1f s", len(records), source, time.perf_counter() - started)
    return records, manifest


def _options(**kwargs: Any) -> BuildOptions:
    return BuildOptions(**kwargs)


def _name_list(value: list[str] | str | None) -> list[str] | None:
    """Accepts ``[en,de]`` (parsed to a list) as well as ``en,de`` or ``en`` on the command line."""
    if value is None or isinstance(value, list):
        return value
    return [name.strip() for name in value.split(",") if name.strip()]


def build_mpararel(
    root: str | Path, options: BuildOptions, all_patterns: bool = False, unreviewed_languages: str = "keep"
) -> tuple[list[FactRecord], dict[str, Any]]:
    """Builds records from mParaRel (see :func:`knlight.data.sources.read_mpararel`).

    Args:
        root: The mParaRel folder.
        options: The shared options.
        all_patterns: Keep patterns reviewers did not check.
        unreviewed_languages: "keep" or "skip" languages where no pattern was reviewed.

    Returns:
        The records and the manifest.
    """
    return build_records(
        "mpararel",
        root,
        lambda opts, report: read_mpararel(Path(root), opts, report, all_patterns, unreviewed_languages),
        options,
        {"all_patterns": all_patterns, "unreviewed_languages": unreviewed_languages},
    )


def build_rml_precursor(
    root: str | Path,
    options: BuildOptions,
    pararel_root: str | Path | None = None,
    mpararel_root: str | Path | None = None,
) -> tuple[list[FactRecord], dict[str, Any]]:
    """Builds records from the RML-LAMA precursor (see :mod:`knlight.data.precursor`).

    Args:
        root: The folder holding ``Aligned_my_MLAMA/``.
        options: The shared options.
        pararel_root: ParaRel folder to recover English subjects; None leaves subjects empty.
        mpararel_root: mParaRel folder to recover subjects in the other languages.

    Returns:
        The records and the manifest.
    """
    return build_records(
        "rml_precursor",
        root,
        lambda opts, report: read_rml_precursor(
            Path(root),
            opts,
            report,
            Path(pararel_root) if pararel_root is not None else None,
            Path(mpararel_root) if mpararel_root is not None else None,
        ),
        options,
        {
            "pararel_root": None if pararel_root is None else str(pararel_root),
            "mpararel_root": None if mpararel_root is None else str(mpararel_root),
        },
    )


def build_pararel(root: str | Path, options: BuildOptions) -> tuple[list[FactRecord], dict[str, Any]]:
    """Builds English records from ParaRel (see :func:`knlight.data.sources.read_pararel`).

    Args:
        root: The ParaRel folder (with ``data/``).
        options: The shared options.

    Returns:
        The records and the manifest.
    """
    return build_records(
        "pararel", root, lambda opts, report: read_pararel(Path(root), opts, report), options, {}
    )


def build_mlama(root: str | Path, options: BuildOptions) -> tuple[list[FactRecord], dict[str, Any]]:
    """Builds records from a folder in the mLAMA layout (see :func:`knlight.data.sources.read_mlama`).

    Args:
        root: The folder with one subfolder per language.
        options: The shared options.

    Returns:
        The records and the manifest.
    """
    return build_records(
        "mlama", root, lambda opts, report: read_mlama(Path(root), opts, report), options, {}
    )


def _write(output: str, built: tuple[list[FactRecord], dict[str, Any]]) -> None:
    records, manifest = built
    manifest_path = write_records(output, records, manifest)
    logger.info("records: %s, manifest: %s", output, manifest_path)


# The subcommands below are what jsonargparse turns into the command line; their docstrings are the help.


def mpararel(
    root: str,
    output: str,
    languages: list[str] | str | None = None,
    relations: list[str] | str | None = None,
    max_facts_per_relation: int | None = None,
    all_languages: bool = True,
    model_kind: Literal["masked", "causal"] = "masked",
    dedup: bool = True,
    num_wrong_objects: int = 3,
    seed: int = 0,
    strict_scripts: bool = False,
    all_patterns: bool = False,
    unreviewed_languages: Literal["keep", "skip"] = "keep",
) -> None:
    """Build from mParaRel (patterns/<lang>/<P>.jsonl + tuples/<lang>/<P>.jsonl), aligned on Wikidata ids.

    Args:
        root: mParaRel folder, e.g. ../shared/data/mpararel.
        output: Records file to write (JSONL); the manifest goes beside it.
        languages: Language codes to keep, e.g. [en,de,ja] or en,de,ja; default: every language with tuples.
        relations: Relation ids to keep, e.g. [P36,P37] or P36,P37; default: all.
        max_facts_per_relation: Keep at most this many facts per relation (seeded choice); default: all.
        all_languages: Keep only facts present in every chosen language.
        model_kind: masked, or causal (drop templates whose [Y] comes before [X]).
        dedup: Drop repeated queries within a record.
        num_wrong_objects: Wrong objects per record, from other facts of the same relation.
        seed: Seed of the fact subset and of the wrong objects.
        strict_scripts: Fail (instead of warn) when a record lacks its language's script.
        all_patterns: Keep patterns that reviewers did not check (default: only checked-by-human ones in
            languages that were reviewed).
        unreviewed_languages: keep or skip languages where no pattern is checked-by-human (en, ru, ja, ko,
            fi, hu, ar in this release).
    """
    options = _options(
        languages=_name_list(languages),
        relations=_name_list(relations),
        max_facts_per_relation=max_facts_per_relation,
        all_languages=all_languages,
        model_kind=model_kind,
        dedup=dedup,
        num_wrong_objects=num_wrong_objects,
        seed=seed,
        strict_scripts=strict_scripts,
    )
    _write(output, build_mpararel(root, options, all_patterns, unreviewed_languages))


def rml_precursor(
    root: str,
    output: str,
    languages: list[str] | str | None = None,
    relations: list[str] | str | None = None,
    max_facts_per_relation: int | None = None,
    all_languages: bool = True,
    model_kind: Literal["masked", "causal"] = "masked",
    dedup: bool = True,
    num_wrong_objects: int = 3,
    seed: int = 0,
    strict_scripts: bool = False,
    pararel_root: str | None = None,
    mpararel_root: str | None = None,
) -> None:
    """Build from the RML-LAMA precursor (Aligned_my_MLAMA/<lang>.json), restoring the deleted object slot.

    Args:
        root: Precursor folder holding Aligned_my_MLAMA/, e.g. ../shared/data/rml-lama-precursor.
        output: Records file to write (JSONL); the manifest goes beside it.
        languages: Language codes to keep, e.g. [en,fr,ja] or en,fr,ja; default: all.
        relations: Relation ids to keep, e.g. [P36,P37] or P36,P37; default: all.
        max_facts_per_relation: Keep at most this many facts per relation (seeded choice); default: all.
        all_languages: Keep only facts present in every chosen language.
        model_kind: masked, or causal (keep only queries whose slot is at the end).
        dedup: Drop repeated queries within a record.
        num_wrong_objects: Wrong objects per record, from other facts of the same relation.
        seed: Seed of the fact subset and of the wrong objects.
        strict_scripts: Fail (instead of warn) when a record lacks its language's script.
        pararel_root: ParaRel folder, to recover English subjects by uuid (default: subjects left empty).
        mpararel_root: mParaRel folder, to recover subjects in the other languages.
    """
    options = _options(
        languages=_name_list(languages),
        relations=_name_list(relations),
        max_facts_per_relation=max_facts_per_relation,
        all_languages=all_languages,
        model_kind=model_kind,
        dedup=dedup,
        num_wrong_objects=num_wrong_objects,
        seed=seed,
        strict_scripts=strict_scripts,
    )
    _write(output, build_rml_precursor(root, options, pararel_root, mpararel_root))


def pararel(
    root: str,
    output: str,
    languages: list[str] | str | None = None,
    relations: list[str] | str | None = None,
    max_facts_per_relation: int | None = None,
    all_languages: bool = True,
    model_kind: Literal["masked", "causal"] = "masked",
    dedup: bool = True,
    num_wrong_objects: int = 3,
    seed: int = 0,
    strict_scripts: bool = False,
) -> None:
    """Build English records from ParaRel (data/pattern_data/graphs_json + data/trex_lms_vocab).

    Args:
        root: ParaRel folder holding data/, e.g. ../shared/data/pararel.
        output: Records file to write (JSONL); the manifest goes beside it.
        languages: Only [en] is available.
        relations: Relation ids to keep, e.g. [P36,P37] or P36,P37; default: all.
        max_facts_per_relation: Keep at most this many facts per relation (seeded choice); default: all.
        all_languages: Keep only facts present in every chosen language.
        model_kind: masked, or causal (drop templates whose [Y] comes before [X]).
        dedup: Drop repeated queries within a record.
        num_wrong_objects: Wrong objects per record, from other facts of the same relation.
        seed: Seed of the fact subset and of the wrong objects.
        strict_scripts: Fail (instead of warn) when a record lacks its language's script.
    """
    options = _options(
        languages=_name_list(languages),
        relations=_name_list(relations),
        max_facts_per_relation=max_facts_per_relation,
        all_languages=all_languages,
        model_kind=model_kind,
        dedup=dedup,
        num_wrong_objects=num_wrong_objects,
        seed=seed,
        strict_scripts=strict_scripts,
    )
    _write(output, build_pararel(root, options))


def mlama(
    root: str,
    output: str,
    languages: list[str] | str | None = None,
    relations: list[str] | str | None = None,
    max_facts_per_relation: int | None = None,
    all_languages: bool = True,
    model_kind: Literal["masked", "causal"] = "masked",
    dedup: bool = True,
    num_wrong_objects: int = 3,
    seed: int = 0,
    strict_scripts: bool = False,
) -> None:
    """Build from the mLAMA layout (<lang>/templates.jsonl + <lang>/<P>.jsonl), aligned on uuid.

    Args:
        root: Folder with one subfolder per language.
        output: Records file to write (JSONL); the manifest goes beside it.
        languages: Language codes to keep, e.g. [en,ja] or en,ja; default: all.
        relations: Relation ids to keep, e.g. [P36,P37] or P36,P37; default: all.
        max_facts_per_relation: Keep at most this many facts per relation (seeded choice); default: all.
        all_languages: Keep only facts present in every chosen language.
        model_kind: masked, or causal (drop templates whose [Y] comes before [X]).
        dedup: Drop repeated queries within a record.
        num_wrong_objects: Wrong objects per record, from other facts of the same relation.
        seed: Seed of the fact subset and of the wrong objects.
        strict_scripts: Fail (instead of warn) when a record lacks its language's script.
    """
    options = _options(
        languages=_name_list(languages),
        relations=_name_list(relations),
        max_facts_per_relation=max_facts_per_relation,
        all_languages=all_languages,
        model_kind=model_kind,
        dedup=dedup,
        num_wrong_objects=num_wrong_objects,
        seed=seed,
        strict_scripts=strict_scripts,
    )
    _write(output, build_mlama(root, options))


SUBCOMMANDS = [mpararel, rml_precursor, pararel, mlama]


def main(args: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        args: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on bad input (the message is printed to stderr).
    """
    from jsonargparse import CLI  # only the command line needs it

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        CLI(
            SUBCOMMANDS,
            args=None if args is None else list(args),
            as_positional=False,
            prog="python -m knlight.data.build",
        )
    except DataError as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
