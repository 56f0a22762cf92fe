#!/usr/bin/env bash
# The README's worked example, run end to end: every command as the README shows it, its
# full output and its wall-clock time. This is how examples/worked_example_transcript.txt
# was made:
#
#     bash examples/worked_example.sh > examples/worked_example_transcript.txt
#
# It works in a fresh temporary folder (a link to examples/ makes the README's relative
# paths work there) and leaves nothing behind. Needs `pip install ".[extract]" onnx`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
ln -s "$root/examples" examples

echo "# dpfc_native $(dpfc --version 2>&1 | awk '{print $NF}'), $(nproc) CPU cores," \
     "load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"
TIMEFORMAT='(%R s wall, %U s user + %S s system CPU)'
run() {
    echo "\$ $*"
    { time "$@" 2>&1; } 2>&1
}
run python examples/worked_example_data.py work
run dpfc extract work/images/train work/pixels.onnx -o work/train.npz
run dpfc extract work/images/test work/pixels.onnx -o work/test.npz
run dpfc plan --n 1347 --dim 64 --num-classes 10 --method ls -e 0.5 -e 1 -e 2 -e 8
run dpfc train work/train.npz --test work/test.npz --method ls --epsilon 2 --num-classes 10 -o work/model.npz
run dpfc predict work/model.npz work/test.npz
