#!/usr/bin/env bash
# Starts (and installs, if missing) the services the test suite talks to, on loopback. Idempotent:
# a service that already answers is left alone. Debian/Ubuntu machines; run as root to install.
#
#   PostgreSQL  127.0.0.1:5432  user postgres, trust auth (TEST_DATABASE_URL)
#   RabbitMQ    127.0.0.1:5672  guest/guest (loopback only); the worker tests create a vhost each
#               with rabbitmqctl, which therefore must work for this user (root)
#   s3s-fs      the S3-compatible server the storage tests start per test, on a free loopback
#               port: installed here (cargo install s3s-fs 0.14.1; later versions need rustc 1.96)
#   tools       prlimit and faketime (Debian's faketime), for the worker suite's memory-limit and
#               clock-skew faults; the cgroup tests also need a writable cgroup v1 memory controller
#
# Usage: scripts/services.sh [postgres|rabbitmq|s3 ...]     (no argument: all)
set -euo pipefail

WAIT_S=${SERVICES_WAIT_S:-60}
say() { echo "services: $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # host port name
    local start=$SECONDS
    until port_open "$1" "$2"; do
        if (( SECONDS - start >= WAIT_S )); then say "$3 did not answer on $1:$2 within ${WAIT_S}s"; return 1; fi
        sleep 0.5
    done
    say "$3 answers on $1:$2"
}

apt_install() {
    [ "$(id -u)" -eq 0 ] || { say "need root to install $*"; return 1; }
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

up_postgres() {
    if ! port_open 127.0.0.1 5432; then
        command -v pg_ctlcluster >/dev/null || apt_install postgresql
        local ver
        ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
        if [ -z "$ver" ]; then
            ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
            pg_createcluster "$ver" main >/dev/null
        fi
        local conf=/etc/postgresql/$ver/main
        # Loopback, trust: a throwaway test server.
        printf "listen_addresses = 'localhost'\nport = 5432\n" > "$conf/conf.d/zz-audotics-tests.conf"
        if ! grep -q 'audotics tests' "$conf/pg_hba.conf"; then
            printf '# audotics tests: trust loopback\nlocal all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' \
                | cat - "$conf/pg_hba.conf" > "$conf/pg_hba.conf.new" && mv "$conf/pg_hba.conf.new" "$conf/pg_hba.conf"
            chown postgres:postgres "$conf/pg_hba.conf" "$conf/conf.d/zz-audotics-tests.conf"
        fi
        say "starting PostgreSQL $ver"
        pg_ctlcluster --skip-systemctl-redirect "$ver" main start || pg_ctlcluster --skip-systemctl-redirect "$ver" main restart
    fi
    wait_port 127.0.0.1 5432 PostgreSQL
    psql -w -h 127.0.0.1 -U postgres -d postgres -XtAc 'select 1' >/dev/null \
        || { say "PostgreSQL answers but user postgres cannot connect without a password"; return 1; }
}

up_rabbitmq() {
    if ! port_open 127.0.0.1 5672; then
        command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
        mkdir -p /etc/rabbitmq
        if [ ! -s /etc/rabbitmq/rabbitmq.conf ]; then
            printf 'listeners.tcp.1 = 127.0.0.1:5672\nloopback_users.guest = true\n' > /etc/rabbitmq/rabbitmq.conf
        fi
        # A node that was just stopped can take seconds to exit, and a start meanwhile fails with
        # "node already running": try up to three times while the port stays closed.
        local tries=0 start=$SECONDS
        until port_open 127.0.0.1 5672; do
            if ! pgrep -u rabbitmq -x beam.smp >/dev/null 2>&1 && [ "$tries" -lt 3 ]; then
                tries=$((tries + 1))
                say "starting RabbitMQ (rabbitmq-server -detached)"
                rabbitmq-server -detached >/dev/null 2>&1 || true
                sleep 3
            fi
            if (( SECONDS - start >= 2 * WAIT_S )); then say "RabbitMQ did not answer on 127.0.0.1:5672"; return 1; fi
            sleep 0.5
        done
    fi
    wait_port 127.0.0.1 5672 RabbitMQ
    rabbitmqctl -q await_startup >/dev/null \
        || { say "RabbitMQ answers but rabbitmqctl cannot reach the node (the worker tests need it)"; return 1; }
}

S3S_FS_VERSION=0.14.1
up_s3() {
    local bin=${S3S_FS_BIN:-${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs}
    if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
        say "s3s-fs $S3S_FS_VERSION is installed ($bin)"
        return 0
    fi
    say "installing s3s-fs $S3S_FS_VERSION (cargo install; a few minutes on 2 cores)"
    cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked --quiet
}

up_tools() { # what the worker suite's faults need: prlimit (util-linux) and libfaketime
    command -v prlimit >/dev/null || apt_install util-linux
    command -v faketime >/dev/null || apt_install faketime
    say "fault tools: $(command -v prlimit) $(command -v faketime)"
}

wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(postgres rabbitmq s3 tools)
for svc in "${wanted[@]}"; do
    case $svc in
        postgres) up_postgres ;;
        rabbitmq) up_rabbitmq ;;
        s3) up_s3 ;;
        tools) up_tools ;;
        *) say "unknown service $svc"; exit 2 ;;
    esac
done
