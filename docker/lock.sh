#!/usr/bin/env bash
# Regenerates the images' hash-locked requirements (docker/requirements/IMAGE.txt) from their IMAGE.in files,
# for the images' platform: CPython 3.11 on Linux x86_64 (manylinux_2_28). Run from anywhere:
#   docker/lock.sh                 # every image
#   docker/lock.sh operator        # one image (engine, engine-cpu, operator, router)
# Needs uv (`pip install uv`) and PyPI. pyproject.toml's version floors (dependencies and build requirements)
# apply as constraints, so an image never locks a version the package does not accept. The CPU build of torch
# is only on PyTorch's CPU index: TORCH_CPU_FIND_LINKS overrides where uv finds it (a directory holding
# that wheel works, where the index cannot be reached; the hash uv records is the file's own either way).
set -euo pipefail
cd "$(dirname "$0")/.."
req=docker/requirements
torch_cpu=${TORCH_CPU_FIND_LINKS:-https://download.pytorch.org/whl/cpu/torch/}
extra_args=()
[[ -n ${UV_ARGS:-} ]] && read -ra extra_args <<<"$UV_ARGS"

constraints=$(mktemp --suffix=.txt)
trap 'rm -f "$constraints"' EXIT
python3 - "$constraints" <<'EOF'
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
floors = project["project"]["dependencies"] + project["build-system"]["requires"]
with open(sys.argv[1], "w") as out:
    out.write("\n".join(floors) + "\n")
EOF

lock() {  # IMAGE [uv options...]
  local image=$1
  shift
  uv pip compile "$req/$image.in" --output-file "$req/$image.txt" --constraint "$constraints" \
    --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --only-binary :all: \
    --custom-compile-command "docker/lock.sh $image" --quiet "$@" "${extra_args[@]}"
  echo "locked $req/$image.txt"
}

images=("$@")
((${#images[@]})) || images=(engine engine-cpu operator router)
for image in "${images[@]}"; do
  case $image in
    engine-cpu) lock "$image" --find-links "$torch_cpu" ;;
    engine | operator | router) lock "$image" ;;
    *) echo "unknown image: $image (engine, engine-cpu, operator, router)" >&2; exit 2 ;;
  esac
done
