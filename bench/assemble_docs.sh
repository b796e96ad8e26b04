#!/usr/bin/env bash
# docs/benchmarks.md = a header (machine, date) + docs/benchmarks/<area>.md, in data-flow order.
# Each area's file holds the latest output of its script in bench/ and says how it was measured.
#   bash bench/assemble_docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# Benchmarks"
    echo
    echo "Latest results of the scripts in \`bench/\`, one section per area (sources: \`docs/benchmarks/*.md\`)."
    echo "Machine: the project's development machine — $(nproc)-core $(uname -m) CPU," \
         "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM, no GPU; assembled $(date -u +%F)."
    echo "CPU paths of the machine that assembled it: $(grep -o 'avx2\|avx512f\|amx_tile' /proc/cpuinfo | sort -u | paste -sd, -)."
    echo "Machines differ (some AVX2 only, some AVX-512 with AMX, which vLLM's CPU kernels take for bf16): each"
    echo "section gives its own run's date, load and CPU flags; a section without flags predates recording them."
    for area in foundation plugin profiler server stream shared slots fleet routing gpu-check soak quality; do
        [ -f "docs/benchmarks/$area.md" ] || continue
        echo
        sed 's/^#/##/' "docs/benchmarks/$area.md"
    done
} > docs/benchmarks.md.tmp
mv docs/benchmarks.md.tmp docs/benchmarks.md
