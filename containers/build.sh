#!/usr/bin/env bash
# Build and push the pipeline's CPU and GPU images, then write their names to
# containers/images.json, the file `python pipeline.py --compile` reads (pipeline.config.
# load_images), so a compiled pipeline always names the images that were just pushed; and the
# CPU image to manifests/kserve/predictor-image.env, the KServe predictor's image.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: containers/build.sh [--no-push] [REGISTRY [TAG]]

Builds containers/Dockerfile.cpu and containers/Dockerfile.gpu (context: the repository root),
pushes both, and rewrites containers/images.json as
  {"cpu": "REGISTRY/iris-image-pipeline-cpu:TAG@sha256:...", "gpu": "REGISTRY/iris-image-pipeline-gpu:TAG@sha256:..."}
The digest comes from the push, so the compiled pipeline pins exactly the pushed images.
It also writes IMAGE=<the cpu name> to manifests/kserve/predictor-image.env (the KServe
predictor runs the CPU image). Both files are written only after every build and push succeeded.

Arguments (each also read from the environment variable of the same name; arguments win):
  REGISTRY   registry and path prefix, e.g. ghcr.io/my-org or 123456789012.dkr.ecr.eu-west-1.amazonaws.com
             (default: localhost:5000, a placeholder for a local registry)
  TAG        image tag (default: <version in pyproject.toml>-g<git short commit>[-dirty]);
             "latest" is refused: a moving tag lets a compiled pipeline and its images drift.

Options:
  --no-push  build only; images.json gets REGISTRY/NAME:TAG without a digest.
  -h, --help show this help.

Environment:
  DOCKER       docker-compatible CLI to call (default: docker)
  PLATFORM     target platform (default: linux/amd64: TensorFlow's CUDA wheels are x86_64 only)
  IMAGES_FILE  where to write the image names (default: containers/images.json)
  PREDICTOR_IMAGE_FILE  where to write the predictor image (default: manifests/kserve/predictor-image.env)

Example:
  containers/build.sh ghcr.io/my-org 0.1.0 && python pipeline.py --compile -o pipeline.yaml
EOF
}

die() { echo "build.sh: error: $*" >&2; exit 2; }

push=1
positional=()
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --no-push) push=0 ;;
        -*) die "unknown option '$arg' (see --help)" ;;
        *) positional+=("$arg") ;;
    esac
done
[ "${#positional[@]}" -le 2 ] || die "expected at most REGISTRY and TAG, got: ${positional[*]}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
docker_cli="${DOCKER:-docker}"
platform="${PLATFORM:-linux/amd64}"
images_file="${IMAGES_FILE:-$root/containers/images.json}"
predictor_file="${PREDICTOR_IMAGE_FILE:-$root/manifests/kserve/predictor-image.env}"

registry="${positional[0]:-${REGISTRY:-localhost:5000}}"
registry="${registry%/}"
[ -n "$registry" ] || die "REGISTRY is empty"
case "$registry" in
    *[[:space:]]*|*:*/*:*|*@*) die "REGISTRY '$registry' is not a registry/path prefix" ;;
esac

default_tag() {
    local version sha
    version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$root/pyproject.toml" | head -n 1)"
    [ -n "$version" ] || die "cannot read the version from $root/pyproject.toml"
    if sha="$(git -C "$root" rev-parse --short=8 HEAD 2>/dev/null)"; then
        if [ -n "$(git -C "$root" status --porcelain -- pyproject.toml README.md pipeline components containers 2>/dev/null)" ]; then
            sha="$sha-dirty"
        fi
        echo "$version-g$sha"
    else
        echo "$version"
    fi
}
tag="${positional[1]:-${TAG:-$(default_tag)}}"
[[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "TAG '$tag' is not a valid image tag"
[ "$tag" != "latest" ] || die "TAG 'latest' is refused: use an immutable tag (a version or commit)"

revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"

# Resolve "repo:tag" to "repo:tag@sha256:..." from the digest the registry returned on push.
pinned_name() {
    local repo="$1" ref="$2" digest
    digest="$("$docker_cli" image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$ref" \
              | sed -n "s#^${repo}@\(sha256:[0-9a-f]\{64\}\)\$#\1#p" | head -n 1)"
    [ -n "$digest" ] || die "no registry digest for $ref after push (docker image inspect shows none for $repo)"
    echo "$ref@$digest"
}

declare -A names
for variant in cpu gpu; do
    repo="$registry/iris-image-pipeline-$variant"
    ref="$repo:$tag"
    echo "build.sh: building $ref from containers/Dockerfile.$variant ($platform)" >&2
    "$docker_cli" build \
        --file "$root/containers/Dockerfile.$variant" \
        --platform "$platform" \
        --tag "$ref" \
        --label "org.opencontainers.image.version=$tag" \
        --label "org.opencontainers.image.revision=$revision" \
        "$root"
    if [ "$push" -eq 1 ]; then
        echo "build.sh: pushing $ref" >&2
        "$docker_cli" push "$ref"
        names[$variant]="$(pinned_name "$repo" "$ref")"
    else
        names[$variant]="$ref"
    fi
done

# Atomic rewrites: a temp file in the target's directory, renamed over the old file.
write_file() {
    local target="$1" content="$2" tmp
    tmp="$(mktemp "$(dirname "$target")/.$(basename "$target").XXXXXX")"
    printf '%s' "$content" > "$tmp" || { rm -f "$tmp"; die "cannot write $target"; }
    chmod 644 "$tmp"
    mv "$tmp" "$target"
}
write_file "$images_file" "$(printf '{\n  "cpu": "%s",\n  "gpu": "%s"\n}' "${names[cpu]}" "${names[gpu]}")
"
write_file "$predictor_file" "IMAGE=${names[cpu]}
"
echo "build.sh: wrote $images_file and $predictor_file:" >&2
cat "$images_file" "$predictor_file" >&2
