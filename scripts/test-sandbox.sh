#!/bin/bash
# The guide's automated test of a sandbox image, for users without the Python
# package: ./scripts/test-sandbox.sh stigmer-sandbox-basic:local
# It runs the same checks as `inv sandbox.test` (stigmer_sandbox/resources/smoke-checks.tsv),
# each in a fresh `docker run --rm` container, as the guide does.
set -e

IMAGE=${1:-stigmer-sandbox-basic:local}
KIND=${2:-}
CHECKS="$(dirname "$0")/../stigmer_sandbox/resources/smoke-checks.tsv"

if [ -z "$KIND" ]; then
    case "$IMAGE" in *full*) KIND=full ;; *) KIND=basic ;; esac
fi

# The full image lists its tools, with their checks, in /opt/tools/manifest.json.
tool_checks() {
    [ "$KIND" = full ] || return 0
    docker run --rm "$IMAGE" jq -r \
        'to_entries[] | ["full", "tool " + .key, .value.check, .value.expect] | join("\t")' \
        /opt/tools/manifest.json
}

echo "Testing sandbox image: $IMAGE"
failed=0
while IFS=$'\t' read -r kinds name command expect; do
    case "$kinds" in '#'* | '') continue ;; esac
    case ",$kinds," in *",$KIND,"*) ;; *) continue ;; esac
    echo "✓ Testing $name..."
    if ! output=$(docker run --rm "$IMAGE" bash -c "$command" 2>&1); then
        echo "✗ $name failed: $output" >&2
        failed=$((failed + 1))
    elif ! grep -Eq -- "$expect" <<<"$output"; then
        echo "✗ $name: output does not match /$expect/: $output" >&2
        failed=$((failed + 1))
    fi
done < <(cat "$CHECKS"; tool_checks)

if [ "$failed" -ne 0 ]; then
    echo "❌ $failed test(s) failed" >&2
    exit 1
fi
echo "✅ All tests passed!"
