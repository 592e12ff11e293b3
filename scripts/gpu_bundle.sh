#!/usr/bin/env bash
# Builds the offline bundle for a GPU host that has no network and takes only
# a compact upload (see docs/gpu.md). Run from anywhere; writes <repo>/.bundle/:
#
#   deno.xz          this machine's Deno binary (the pinned 2.9.6), xz -9
#   deno_dir.tar.xz  a DENO_DIR holding only the npm packages this project
#                    fetches (deno install + deno cache of every entry point)
#   fixtures.tar.xz  ../shared/fixtures (the tests read them by that path, and
#                    a checkout sent to the GPU host travels without ../shared)
#   debs/*.deb       the Vulkan loader (libvulkan1, amd64): GPU host images
#                    carry the NVIDIA driver and its ICD but often no loader
#   MANIFEST         what is in it, with sizes and sha256 sums
#
# The checkout itself is not in the bundle: it travels beside it (the device
# tool sends the working tree; elsewhere, copy the repository). Total: about
# 32 MB, almost all of it Deno. Fails if it would exceed 64 MiB.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${BUNDLE_DIR:-$root/.bundle}"
fixtures="${FIXTURES_DIR:-$root/../shared/fixtures}"
limit=$((64 * 1024 * 1024))

deno_bin="$(command -v deno)" || {
  echo "gpu_bundle: deno is not on PATH" >&2
  exit 1
}
want_version="$(sed -n 's/.*"deno: *\([0-9.]*\)".*/\1/p' "$root/deno.json" | head -1)"
have_version="$("$deno_bin" --version | head -1 | awk '{print $2}')"
echo "gpu_bundle: Deno $have_version from $deno_bin -> $out"
for tool in xz tar apt-get sha256sum; do
  command -v "$tool" >/dev/null || {
    echo "gpu_bundle: needs $tool" >&2
    exit 1
  }
done
if [ "$(uname -m)" != "x86_64" ]; then
  echo "gpu_bundle: this machine is $(uname -m); the GPU hosts are x86-64, and so must be the Deno binary" >&2
  exit 1
fi
[ -z "$want_version" ] || [ "$want_version" = "$have_version" ] || {
  echo "gpu_bundle: deno.json pins Deno $want_version but PATH has $have_version" >&2
  exit 1
}

rm -rf "$out"
mkdir -p "$out/debs"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. Deno, xz-compressed (about 125 MB -> 31 MB).
xz -T0 -9 -c "$deno_bin" >"$out/deno.xz"

# 2. A fresh DENO_DIR with only what this project's entry points fetch: the npm
#    packages named in deno.json at the locked versions. Type-checking and code
#    caches are left out (rebuilt there in seconds).
export DENO_DIR="$work/deno_dir"
(
  cd "$root"
  deno install --frozen --quiet
  shopt -s nullglob
  deno cache --frozen --quiet main.ts mod.ts tests/*.ts bench/*.ts
)
[ -d "$DENO_DIR/npm" ] || {
  echo "gpu_bundle: deno cache fetched no npm packages into $DENO_DIR" >&2
  exit 1
}
tar -C "$DENO_DIR" -cf - npm | xz -T0 -9 >"$out/deno_dir.tar.xz"

# 3. Test fixtures, read by tests as ../shared/fixtures.
if [ -d "$fixtures" ]; then
  tar -C "$(dirname "$fixtures")" -cf - "$(basename "$fixtures")" | xz -T0 -9 >"$out/fixtures.tar.xz"
else
  echo "gpu_bundle: warning: no fixtures at $fixtures; tests that use them will fail there" >&2
fi

# 4. The Vulkan loader for amd64, from this machine's Debian/Ubuntu mirror
#    (separate package lists so a non-amd64 host still fetches amd64).
lists="$work/apt-lists"
mkdir -p "$lists/partial"
apt_opts=(-o APT::Sandbox::User=root -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o "Dir::State::Lists=$lists")
apt-get "${apt_opts[@]}" update -qq >/dev/null
(cd "$out/debs" && apt-get "${apt_opts[@]}" download libvulkan1 >/dev/null)

# 5. Manifest and size check.
(
  cd "$out"
  {
    echo "trainer GPU bundle, built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
    echo "deno $have_version"
    find . -type f ! -name MANIFEST | sort | while read -r f; do
      printf '%10d  %s  %s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)" "${f#./}"
    done
  } >MANIFEST
)
total=$(du -sb "$out" | cut -f1)
cat "$out/MANIFEST"
awk -v t="$total" -v o="$out" 'BEGIN { printf "gpu_bundle: %d bytes (%.1f MiB) in %s\n", t, t / 1048576, o }'
if [ "$total" -gt "$limit" ]; then
  echo "gpu_bundle: the bundle is over 64 MiB" >&2
  exit 1
fi
