# Sourced by deploy/postgres.sh and deploy/k8s-api.sh (which define `die`): free_port prints a
# TCP port of 127.0.0.1 that nothing listens on now (random in 20000-59999, 50 tries).
free_port() {
  local p
  for _ in $(seq 1 50); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  die "no free TCP port found on 127.0.0.1"
}
