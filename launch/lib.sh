# shellcheck shell=bash
# Shared by the launch scripts: --print mode and shell quoting. Source it; it runs nothing.

PRINT=0
# --print output goes to fd 3 (the script's stdout), so it shows even from inside $(...).
exec 3>&1

# Prints its arguments as one copy-pasteable shell command (words quoted only where needed).
quote() {
  local word out=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Runs a command, or with --print only shows it (prefixed by "+ ").
run() {
  if ((PRINT)); then
    echo "+ $(quote "$@")" >&3
  else
    "$@"
  fi
}

# Prints the calling script's header comment (from line 2 to the first line that is not a comment).
usage() {
  awk 'NR == 1 { next } !/^#/ { exit } /^#SBATCH/ { next } { sub(/^# ?/, ""); print }' "$0"
}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}
