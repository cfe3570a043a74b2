#!/usr/bin/env bash
# Set-up-time assets (never fetched at run time): the GPT-2 BPE ranks from the openai-whisper sdist (MIT).
# Usage: tools/setup_assets.sh PYTHON
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
dest=assets/gpt2
if [ -f "$dest/gpt2.tiktoken" ]; then exit 0; fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" openai-whisper >/dev/null 2>&1; then
  sdist=$(ls "$tmp"/*.tar.gz | head -1)
  member=$(tar -tzf "$sdist" | grep 'whisper/assets/gpt2.tiktoken$' | head -1)
  tar -xzf "$sdist" -C "$tmp" "$member"
  cp "$tmp/$member" "$dest/gpt2.tiktoken.part" && mv "$dest/gpt2.tiktoken.part" "$dest/gpt2.tiktoken"
  echo "GPT-2 BPE ranks installed in $dest (from openai-whisper sdist, MIT)"
else
  echo "warning: could not download openai-whisper sdist; tokenizer.kind=gpt2 will be unavailable" >&2
fi
