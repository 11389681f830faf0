# Shared by compose-test.sh and cluster.sh (sourced): Docker engine, local base image, compose command.
# Works on a machine without an image registry: a Debian base made with debootstrap, pip through the
# host's CA bundle, torch from the host's wheel. Needs root (dockerd, debootstrap) and apt for the tools.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEPLOY=$ROOT/deploy
export MOE_BASE_IMAGE=${MOE_BASE_IMAGE:-moe-serve-base:bookworm}
STATE=${MOE_DOCKER_STATE:-/var/tmp/moe-serve-docker}  # dockerd's log and pid file, when we start it
DEBIAN_MIRROR=${MOE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=${MOE_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
T0=$(date +%s)

say() { printf '[%s +%3ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - T0))" "$*"; }
die() { say "ERROR: $*" >&2; exit 1; }

# Install Debian packages for missing commands, given as COMMAND:PACKAGE pairs (root and apt-get needed).
ensure_commands() {
  local pair missing=() packages=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || { missing+=("${pair%%:*}"); packages+=("${pair#*:}"); }
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    || die "missing ${missing[*]}: install the Debian packages ${packages[*]} (or run as root)"
  say "installing ${packages[*]} with apt-get (missing: ${missing[*]})"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >/dev/null
}

# What compose-test and cluster need: the Docker engine and client, docker-compose, debootstrap.
ensure_tools() {
  ensure_commands docker:docker.io dockerd:docker.io docker-compose:docker-compose debootstrap:debootstrap
}

# Start dockerd in the background (log: $STATE/dockerd.log) unless an engine already answers.
STARTED_DOCKERD=""
ensure_dockerd() {
  if docker info >/dev/null 2>&1; then say "Docker engine: already running"; return 0; fi
  [ "$(id -u)" = 0 ] || die "no Docker engine answers and starting dockerd needs root"
  mkdir -p "$STATE"
  say "starting dockerd (log: $STATE/dockerd.log)"
  setsid dockerd --pidfile "$STATE/dockerd.pid" >>"$STATE/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && { STARTED_DOCKERD=1; say "Docker engine: up"; return 0; }
    sleep 1
  done
  tail -20 "$STATE/dockerd.log" >&2
  die "dockerd did not answer within 60 s"
}

# Stop the dockerd that ensure_dockerd started (and only that one).
stop_dockerd() {
  [ -n "$STARTED_DOCKERD" ] && [ -f "$STATE/dockerd.pid" ] || return 0
  local pid; pid=$(cat "$STATE/dockerd.pid")
  say "stopping dockerd (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  kill -9 "$pid" 2>/dev/null || true
}

# The Debian bookworm base (python3, venv, pip), made once with debootstrap and kept as a Docker image.
ensure_base_image() {
  if docker image inspect "$MOE_BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $MOE_BASE_IMAGE: cached"; return 0
  fi
  local dir; dir=$(mktemp -d /var/tmp/moe-base.XXXXXX)
  say "base image $MOE_BASE_IMAGE: debootstrap bookworm (about a minute; log: $dir.log)"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$dir" \
      "$DEBIAN_MIRROR" >"$dir.log" 2>&1; then
    tail -20 "$dir.log" >&2; rm -rf "$dir"; die "debootstrap failed"
  fi
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  if ! tar -C "$dir" -c . | docker import - "$MOE_BASE_IMAGE" >/dev/null; then
    rm -rf "$dir"; die "docker import of the base image failed"
  fi
  rm -rf "$dir" "$dir.log"
  say "base image $MOE_BASE_IMAGE: imported"
}

# The host's CA bundle and torch CPU wheel into the build context (deploy/build-extra/), for the local build.
prepare_build_extra() {
  local extra=$DEPLOY/build-extra wheel
  cp "$HOST_CA" "$extra/ca-certificates.crt"
  export MOE_PIP_CERT=/tmp/extra/ca-certificates.crt
  wheel=$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then
    cmp -s "$wheel" "$extra/$(basename "$wheel")" || cp -l "$wheel" "$extra/" 2>/dev/null || cp "$wheel" "$extra/"
    export MOE_TORCH_INDEX_URL=""  # no extra index: the wheel, else PyPI
    say "build extras: host CA bundle, $(basename "$wheel")"
  else
    export MOE_TORCH_INDEX_URL=${MOE_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
    say "build extras: host CA bundle; torch from ${MOE_TORCH_INDEX_URL:-PyPI}"
  fi
}

# docker-compose with the base file and the no-registry override, under project name $PROJECT.
compose() {
  docker-compose -p "$PROJECT" -f "$DEPLOY/docker-compose.yml" -f "$DEPLOY/docker-compose.local.yml" "$@"
}

# Build the moe-serve and Prometheus images (layers cached between runs); the full log goes to $1.
build_images() {
  local log=$1 start; start=$(date +%s)
  say "building images moe-serve:cpu and moe-serve-prometheus:local (log: $log)"
  local status=0  # the build's: under pipefail the pipeline's status is the last failing command's
  compose build model prometheus 2>&1 | tee "$log" | { grep --line-buffered -E '^Step [0-9]+/' || true; } \
    | sed 's/^/    /' || status=$?
  if [ "$status" != 0 ]; then tail -40 "$log" >&2; die "image build failed (log: $log)"; fi
  say "images built in $(($(date +%s) - start)) s"
}

# A TCP port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
