#!/bin/sh
# Ray Serve's HAProxy, kept on loopback. Ray renders HAProxy's stats (*:STATS_PORT) and
# metrics (:METRICS_PORT) listeners on every interface, with no setting for their host;
# this platform binds every server to its `host`. Ray runs this script in place of the
# binary (RAY_SERVE_HAPROXY_BINARY_PATH): it rewrites those bind lines in the config Ray
# passes with -f, then runs the real binary with the same arguments.
set -eu
: "${OPPEN_HAPROXY_BINARY:?the HAProxy binary to run}"
host=${OPPEN_HAPROXY_HOST:-127.0.0.1}
prev=
for arg in "$@"; do
  if [ "$prev" = -f ]; then
    sed -i -E "s/^([[:space:]]*bind )\*?:([0-9]+)/\1$host:\2/" "$arg"
  fi
  prev=$arg
done
exec "$OPPEN_HAPROXY_BINARY" "$@"
