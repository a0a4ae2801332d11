"""The multi-domain benchmark: questions over real documentation, per domain a dev and a test split.

    python3 -m ragcomp.eval.domains build --out benchmarks/domains

downloads the Debian packages named in `ragcomp.eval.domain_sources.SOURCES` (`apt-get download`,
cached under ~/.cache/ragcomp/debs), unpacks them (`dpkg-deb -x`), renders each document to text
(`ragcomp.eval.domain_text`), chunks it as users do (by section, or into 256/512-token chunks with
LlamaIndex's `SentenceSplitter`), writes questions from the text itself and writes per domain:

    DIR/<domain>/passages.jsonl.gz   {"id", "text", "doc", "title"}, one passage a line
    DIR/<domain>/dev.jsonl           questions in the qa_dev.jsonl format, plus "doc" (source
    DIR/<domain>/test.jsonl          document) and "passage_words"; "titles" are passage ids
    DIR/manifest.json                packages (version, sha256 of the .deb), counts, drop reasons

Every question's evidence is one sentence of its passage as `ragcomp.text.split_sentences` cuts it
(a verbatim substring), its answer (where there is a short one) is not in the question, and dev and
test come from disjoint source documents (split by a hash of the document id). Questions without a
short answer (FAQ entries) have `"answers": []`: the suite counts their evidence sentence instead.
Output is deterministic given the package files (gzip without timestamps, sorted inputs, seeded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ragcomp.eval.domain_core import DEFAULT_PER_SPLIT, FORMAT_VERSION, write_domain
from ragcomp.eval.domain_sources import SOURCES

# -- packages --------------------------------------------------------------------------------------


def deb_cache() -> Path:
    from ragcomp.models import cache_dir

    return cache_dir() / "debs"


def fetch_deb(package: str, cache: Path) -> Path:
    """The cached .deb of `package` (the newest one there), downloaded with apt-get when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=cache, check=True, stdout=subprocess.DEVNULL)
        found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        raise FileNotFoundError(f"apt-get download {package} left no {package}_*.deb in {cache}")
    return found[-1]


def deb_record(path: Path) -> dict[str, str]:
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(path), "Package", "Version"], check=True, capture_output=True, text=True
    ).stdout
    info = dict(line.split(": ", 1) for line in fields.strip().splitlines() if ": " in line)
    return {
        "package": info.get("Package", path.name),
        "version": info.get("Version", ""),
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def extract_deb(path: Path, into: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(path), str(into)], check=True)


def build(
    out: str | Path,
    domains: list[str] | None = None,
    cache: str | Path | None = None,
    per_split: int = DEFAULT_PER_SPLIT,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the named domains (default: all in SOURCES) into `out`; returns the manifest."""
    out = Path(out)
    names = domains or list(SOURCES)
    unknown = [d for d in names if d not in SOURCES]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {', '.join(SOURCES)}")
    cache = Path(cache) if cache else deb_cache()
    manifest_path = out / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("domains", {})
    manifest["format_version"] = FORMAT_VERSION
    manifest["command"] = "python3 -m ragcomp.eval.domains build --out " + str(out)
    for name in names:
        source = SOURCES[name]
        with tempfile.TemporaryDirectory(prefix=f"ragcomp-{name}-") as tmp:
            records = []
            for pkg in source.packages:
                deb = fetch_deb(pkg, cache)
                records.append(deb_record(deb))
                extract_deb(deb, Path(tmp))
            if progress:
                print(f"building {name} from {', '.join(source.packages) or source.origin}", file=sys.stderr)
            built = source.build(Path(tmp))
        entry = write_domain(out, name, built, per_split)
        entry.update(
            {
                "packages": records,
                "origin": source.origin,
                "license": source.license,
                "description": source.description,
            }
        )
        manifest["domains"][name] = entry
        if progress:
            print(
                f"  {name}: {entry['passages']} passages, dev {entry['dev']['questions']}, "
                f"test {entry['test']['questions']} questions",
                file=sys.stderr,
            )
    manifest["domains"] = dict(sorted(manifest["domains"].items()))
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m ragcomp.eval.domains",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the packages and write passages and questions")
    b.add_argument("--out", required=True, help="suite folder (e.g. benchmarks/domains)")
    b.add_argument("--domain", action="append", help="only these domains (repeatable; default all)")
    b.add_argument("--cache", help="where .debs are cached (default ~/.cache/ragcomp/debs)")
    b.add_argument("--per-split", type=int, default=DEFAULT_PER_SPLIT, help="questions per split at most")
    args = p.parse_args(argv)
    build(args.out, args.domain, args.cache, args.per_split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
