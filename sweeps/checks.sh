# Sourced by the sweep scripts: refuse a bad environment setting before any run starts.
#   need_int NAME MIN            the variable NAME holds an integer >= MIN
#   need_numbers NAME MIN MAX    NAME holds one number, or a comma-separated list, each in [MIN, MAX]
#   need_number NAME MIN MAX     NAME holds exactly one number in [MIN, MAX] (a setting that is not swept)
#   need_choices NAME A B ...    NAME holds a comma-separated list of some of A B ...
need_int() {
  local value=${!1}
  # no leading zeros: bash would read 010 as octal, Hydra as the string '010'
  if ! [[ $value =~ ^(0|[1-9][0-9]*)$ ]] || (( value < $2 )); then
    echo "$1=$value must be an integer >= $2" >&2; exit 2
  fi
}
need_numbers() {
  local value=${!1} item
  IFS=, read -ra items <<< "$value"
  [[ ${#items[@]} -gt 0 ]] || { echo "$1 is empty; give a number in [$2, $3]" >&2; exit 2; }
  for item in "${items[@]}"; do
    if ! [[ $item =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || [[ $item =~ ^0[0-9] ]] || ! awk -v x="$item" -v lo="$2" -v hi="$3" 'BEGIN { exit !(x >= lo && x <= hi) }'; then
      echo "$1=$value: '$item' must be a number in [$2, $3]" >&2; exit 2
    fi
  done
}
need_number() {
  [[ ${!1} != *,* ]] || { echo "$1=${!1} must be one number in [$2, $3], not a list" >&2; exit 2; }
  need_numbers "$@"
}
need_choices() {
  local name=$1 value=${!1} item
  shift
  IFS=, read -ra items <<< "$value"
  [[ ${#items[@]} -gt 0 ]] || { echo "$name is empty; give some of: $*" >&2; exit 2; }
  for item in "${items[@]}"; do
    [[ " $* " == *" $item "* ]] || { echo "$name=$value: '$item' is not one of: $*" >&2; exit 2; }
  done
}
