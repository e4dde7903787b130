#!/usr/bin/env bash
# Installs conveyor as a systemd service on this host. Idempotent: run it again to upgrade the
# binary and the unit; an existing /etc/conveyor/conveyor.toml or conveyor.env is never touched
# (the shipped examples land next to them as *.dist for comparison).
#
#   sudo deploy/install.sh                      # build (or take target/release/conveyor), install
#   deploy/install.sh --dry-run                 # print what it would do, change nothing (no root)
#   sudo deploy/install.sh --prefix /opt/conveyor --binary /tmp/conveyor
#
# Options:
#   --prefix DIR   install the binary as DIR/bin/conveyor (default /usr/local); the unit's
#                  ExecStart is rewritten to match
#   --binary FILE  install this binary instead of building
#   --build        always build with `cargo install --path . --root PREFIX`, even when
#                  target/release/conveyor exists (default: copy it when present, else build)
#   --dry-run      print every action instead of doing it
#   -h, --help     this text
set -euo pipefail

prefix=/usr/local
binary=""
force_build=0
dry_run=0

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) [[ $# -ge 2 ]] || { echo "--prefix needs a directory" >&2; exit 2; }; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --binary) [[ $# -ge 2 ]] || { echo "--binary needs a file" >&2; exit 2; }; binary=$2; shift 2 ;;
        --binary=*) binary=${1#--binary=}; shift ;;
        --build) force_build=1; shift ;;
        --dry-run|-n) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
unit_src=$repo/deploy/systemd/conveyor.service
config_src=$repo/deploy/systemd/conveyor.toml
env_src=$repo/deploy/systemd/conveyor.env.example
conf_dir=/etc/conveyor
unit_dst=/etc/systemd/system/conveyor.service
bin_dst=$prefix/bin/conveyor
service_user=conveyor

# Runs a command, or prints it (shell-quoted) under --dry-run.
run() {
    if [[ $dry_run -eq 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}
say() { printf '==> %s\n' "$*"; }

for f in "$unit_src" "$config_src" "$env_src"; do
    [[ -f $f ]] || { echo "missing $f (run from a conveyor checkout)" >&2; exit 1; }
done
[[ $prefix == /* ]] || { echo "--prefix must be an absolute path: $prefix" >&2; exit 2; }
if [[ $dry_run -eq 0 && $EUID -ne 0 ]]; then
    echo "run as root (sudo $0 $*), or with --dry-run to see what it would do" >&2
    exit 1
fi
[[ $dry_run -eq 1 ]] && say "dry run: nothing is changed"

# 1. The binary.
if [[ -n $binary ]]; then
    [[ -x $binary ]] || { echo "--binary $binary is not an executable file" >&2; exit 1; }
    say "installing $binary as $bin_dst"
    run install -D -m 0755 "$binary" "$bin_dst"
elif [[ $force_build -eq 0 && -x $repo/target/release/conveyor ]]; then
    say "installing $repo/target/release/conveyor as $bin_dst (--build to rebuild)"
    run install -D -m 0755 "$repo/target/release/conveyor" "$bin_dst"
else
    command -v cargo >/dev/null || [[ $dry_run -eq 1 ]] ||
        { echo "cargo not found: build first (cargo build --release) or pass --binary" >&2; exit 1; }
    say "building and installing into $prefix/bin with cargo install"
    run cargo install --locked --path "$repo" --root "$prefix" --force
fi

# 2. The system user and group (no login, no home directory of its own: systemd creates
#    /var/lib/conveyor through StateDirectory=).
if getent group "$service_user" >/dev/null; then
    say "group $service_user exists"
else
    say "creating system group $service_user"
    run groupadd --system "$service_user"
fi
if getent passwd "$service_user" >/dev/null; then
    say "user $service_user exists"
else
    say "creating system user $service_user"
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    run useradd --system --gid "$service_user" --home-dir /var/lib/conveyor --no-create-home \
        --shell "$nologin" --comment "conveyor loader daemon" "$service_user"
fi

# 3. Config and secrets: root-owned directory readable by the group; never overwrite.
say "config directory $conf_dir"
run install -d -m 0750 -o root -g "$service_user" "$conf_dir"
if [[ -e $conf_dir/conveyor.toml ]]; then
    say "keeping existing $conf_dir/conveyor.toml (the shipped example: conveyor.toml.dist)"
else
    say "installing $conf_dir/conveyor.toml"
    run install -m 0640 -o root -g "$service_user" "$config_src" "$conf_dir/conveyor.toml"
fi
run install -m 0640 -o root -g "$service_user" "$config_src" "$conf_dir/conveyor.toml.dist"
if [[ -e $conf_dir/conveyor.env ]]; then
    say "keeping existing $conf_dir/conveyor.env"
    run chmod 0600 "$conf_dir/conveyor.env"
else
    say "installing $conf_dir/conveyor.env (mode 0600; edit the two URLs)"
    run install -m 0600 -o root -g root "$env_src" "$conf_dir/conveyor.env"
fi

# 4. The unit (ours: replaced on every run; local changes belong in `systemctl edit conveyor`).
say "installing $unit_dst (ExecStart=$bin_dst)"
if [[ $dry_run -eq 1 ]]; then
    printf '+ sed s|/usr/local/bin/conveyor|%s| %q > %q (mode 0644)\n' "$bin_dst" "$unit_src" "$unit_dst"
else
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    sed "s|/usr/local/bin/conveyor|$bin_dst|g" "$unit_src" > "$tmp"
    install -m 0644 -o root -g root "$tmp" "$unit_dst"
fi
if [[ -d /run/systemd/system ]]; then
    run systemctl daemon-reload
else
    say "systemd is not running here (container?): skipping systemctl daemon-reload"
fi

cat <<NEXT

Next steps:
  1. Put the RabbitMQ and PostgreSQL URLs in $conf_dir/conveyor.env and review
     $conf_dir/conveyor.toml (pipelines, targets). Database role: deploy/sql/role.sql;
     RabbitMQ queue, exchange and policy: deploy/rabbitmq/definitions.json (deploy/README.md).
  2. Check the config, the connections and the target tables, then create conveyor's tables,
     with the service's user and environment:
       systemd-run --pipe --wait -p User=$service_user -p EnvironmentFile=$conf_dir/conveyor.env \\
         $bin_dst --config $conf_dir/conveyor.toml check
       systemd-run --pipe --wait -p User=$service_user -p EnvironmentFile=$conf_dir/conveyor.env \\
         $bin_dst --config $conf_dir/conveyor.toml migrate
  3. Start it now and at boot, and watch it:
       systemctl enable --now conveyor
       systemctl status conveyor; journalctl -u conveyor -f
     Reload the config with \`systemctl reload conveyor\` (applies at each pipeline's next job).
NEXT
