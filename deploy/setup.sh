#!/usr/bin/env bash
# One-shot, idempotent setup of everything Vitrine needs on a fresh Debian machine:
#   - Debian packages: redis-server, prometheus, prometheus-redis-exporter, prometheus-alertmanager (only when missing)
#   - .venv with the vitrine package (re-installed only when pyproject or constraints change)
#   - Apache Kafka (KRaft) jars from Maven Central into the cache folder
#   - a Triton backend folder prepared from the nvidia-pytriton wheel (tritonserver 2.51, python backend)
# A second run only checks stamps and takes about a second.
#
# Environment: PYTHON (interpreter for the venv, default python3), VITRINE_CACHE (default ~/.cache/vitrine),
#              VITRINE_EXTRAS (pip extras, default "dev,train,registry": tests train small models with torch
#              and log them to the stack's MLflow server).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE="${VITRINE_CACHE:-$HOME/.cache/vitrine}"
EXTRAS="${VITRINE_EXTRAS:-dev,train,registry}"
VENV="$ROOT/.venv"
KAFKA_POM="$ROOT/deploy/kafka/pom.xml"
PYTRITON_VERSION="0.7.0"   # ships tritonserver 2.51 with the python backend

log() { printf '[setup] %s\n' "$*"; }
# Run a noisy step quietly; on failure show its output and stop.
quiet() {
  local out; out="$(mktemp)"
  if ! "$@" >"$out" 2>&1; then
    cat "$out" >&2; rm -f "$out"; log "failed: $*"; exit 1
  fi
  rm -f "$out"
}

# 1. Debian packages -------------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v promtool >/dev/null || missing+=(prometheus)
command -v prometheus-redis-exporter >/dev/null || missing+=(prometheus-redis-exporter)
# Debian names the binary prometheus-alertmanager (not alertmanager); amtool comes with it.
command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
command -v amtool >/dev/null || missing+=(prometheus-alertmanager)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  quiet $SUDO apt-get update
  quiet $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
  # Debian's packages start system-wide services on the standard ports; Vitrine runs its own
  # instances on its own ports, so stop the system ones where a service manager started them.
  for svc in redis-server prometheus prometheus-redis-exporter prometheus-alertmanager; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
else
  log "Debian packages present"
fi

# 2. Python virtualenv -----------------------------------------------------------------------
stamp_py="$VENV/.vitrine-installed"
want_py="$(cat "$ROOT/pyproject.toml" "$ROOT/deploy/constraints.txt" 2>/dev/null | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 required"'
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp_py" 2>/dev/null)" != "$want_py" ]; then
  log "installing vitrine[$EXTRAS] into .venv (pip's cache is kept, so torch downloads once)"
  quiet "$VENV/bin/python" -m pip install --upgrade pip
  quiet "$VENV/bin/python" -m pip install -c "$ROOT/deploy/constraints.txt" -e "$ROOT[$EXTRAS]"
  echo "$want_py" > "$stamp_py"
else
  log "python environment up to date"
fi

# 3. Apache Kafka from Maven Central ----------------------------------------------------------
kafka_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM")"
kafka_dir="$CACHE/kafka-$kafka_version"
if [ ! -f "$kafka_dir/.complete" ]; then
  log "fetching Apache Kafka $kafka_version jars from Maven Central into $kafka_dir"
  rm -rf "$kafka_dir"
  quiet mvn -B -f "$KAFKA_POM" dependency:copy-dependencies -DoutputDirectory="$kafka_dir/libs"
  touch "$kafka_dir/.complete"
else
  log "Kafka $kafka_version present"
fi

# 4. Triton from the nvidia-pytriton wheel ---------------------------------------------------
triton_dir="$CACHE/triton-pytriton-$PYTRITON_VERSION"
if [ ! -f "$triton_dir/.complete" ]; then
  log "fetching nvidia-pytriton $PYTRITON_VERSION (tritonserver binary) into $triton_dir"
  rm -rf "$triton_dir"; mkdir -p "$triton_dir/wheel"
  quiet "$VENV/bin/python" -m pip download --no-deps -d "$triton_dir/wheel" "nvidia-pytriton==$PYTRITON_VERSION"
  (cd "$triton_dir" && "$VENV/bin/python" -m zipfile -e wheel/*.whl unpacked)
  pyver="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  mkdir -p "$triton_dir/backends/python"
  cp -r "$triton_dir/unpacked/pytriton/tritonserver/backends/python/." "$triton_dir/backends/python/"
  cp "$triton_dir/unpacked/pytriton/tritonserver/python_backend_stubs/$pyver/triton_python_backend_stub" "$triton_dir/backends/python/"
  mv "$triton_dir/unpacked/pytriton/tritonserver/bin" "$triton_dir/bin"
  mv "$triton_dir/unpacked/nvidia_pytriton.libs" "$triton_dir/lib"
  mv "$triton_dir/unpacked/pytriton/tritonserver/caches" "$triton_dir/caches"
  rm -rf "$triton_dir/unpacked" "$triton_dir/wheel"
  chmod +x "$triton_dir/bin/tritonserver" "$triton_dir/backends/python/triton_python_backend_stub"
  touch "$triton_dir/.complete"
else
  log "Triton (pytriton $PYTRITON_VERSION) present"
fi

log "done: cache in $CACHE, virtualenv in $VENV"
