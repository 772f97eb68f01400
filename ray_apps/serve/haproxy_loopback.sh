#!/bin/sh
# Ray Serve's HAProxy, kept on loopback. Ray renders HAProxy's stats (*:STATS_PORT) and
# metrics (:METRICS_PORT) listeners on every interface, with no setting for their host;
# this platform binds every server to its `host`. Ray renders the admin socket `mode 666
# level admin`, so any local user could drive the front: it becomes `mode 600` (only the
# user Ray and HAProxy run as) at `level operator`, all that Ray's own commands need
# (show stat, show info, show servers state; `expose-fd listeners` still hands the
# sockets over on reload). Ray runs this script in place of the binary
# (RAY_SERVE_HAPROXY_BINARY_PATH): it rewrites those lines in the config Ray passes with
# -f, then runs the real binary with the same arguments.
set -eu
: "${OPPEN_HAPROXY_BINARY:?the HAProxy binary to run}"
host=${OPPEN_HAPROXY_HOST:-127.0.0.1}
prev=
for arg in "$@"; do
  if [ "$prev" = -f ]; then
    sed -i -E \
      -e "s/^([[:space:]]*bind )\*?:([0-9]+)/\1$host:\2/" \
      -e '/^[[:space:]]*stats socket /{s/ mode [0-7]+//; s/^([[:space:]]*stats socket [^[:space:]]+)/\1 mode 600/}' \
      -e '/^[[:space:]]*stats socket /s/ level admin/ level operator/' \
      "$arg"
  fi
  prev=$arg
done
exec "$OPPEN_HAPROXY_BINARY" "$@"
