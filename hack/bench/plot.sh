# shellcheck shell=bash
# Plots for the benchmarks: CSV in, SVG out, drawn by gnuplot (Debian's gnuplot-nox: no X, SVG terminal).
# Source it after hack/lib/common.sh; call plot_init once, then any of:
#
#   plot_lines CSV SVG TITLE XLABEL YLABEL [logx]
#       CSV: a header row, then rows "x,y1,y2,...": one line per column after the first, named by its header.
#   plot_bars CSV SVG TITLE YLABEL [logy]
#       CSV: a header row "what,series1,series2,...", then a row per category: clustered bars (logy: a
#       logarithmic y axis, for values that span decades).
#   plot_cdf CSV SVG TITLE XLABEL
#       CSV: a header row naming the series, then the samples, a column per series (columns may be of unequal
#       length: leave the cell empty). Draws each series' empirical distribution (fraction of samples <= x).
#
# Every CSV is comma-separated with a header row; the benchmarks write it next to the SVG, in docs/benchmarks/,
# so the figures can be redrawn or checked from the numbers.

plot_init() {
  ensure_pkgs gnuplot:gnuplot-nox
}

# _plot_head SVG TITLE XLABEL YLABEL: the gnuplot preamble shared by every plot.
_plot_head() {
  printf 'set terminal svg size 720,420 dynamic font "sans,12" background "white"\n'
  printf 'set output "%s"\n' "$1"
  printf 'set title "%s"\nset xlabel "%s"\nset ylabel "%s"\n' "$2" "$3" "$4"
  printf 'set datafile separator ","\nset key outside right top\nset grid ytics\n'
}

# _plot_columns CSV: the number of columns of the header row.
_plot_columns() {
  head -n1 "$1" | awk -F, '{ print NF }'
}

plot_lines() {
  local csv=$1 svg=$2 title=$3 xlabel=$4 ylabel=$5 logx=${6:-}
  local n
  n=$(_plot_columns "$csv")
  {
    _plot_head "$svg" "$title" "$xlabel" "$ylabel"
    [ "$logx" = logx ] && printf 'set logscale x\n'
    printf 'set key autotitle columnhead\nplot for [i=2:%d] "%s" using 1:i with linespoints lw 2\n' "$n" "$csv"
  } | gnuplot || die "gnuplot failed on $csv"
}

plot_bars() {
  local csv=$1 svg=$2 title=$3 ylabel=$4 logy=${5:-}
  local n
  n=$(_plot_columns "$csv")
  {
    _plot_head "$svg" "$title" "" "$ylabel"
    printf 'set style data histograms\nset style histogram clustered gap 1\nset style fill solid 0.8 border -1\n'
    if [ "$logy" = logy ]; then printf 'set logscale y\nset yrange [1:*]\n'; else printf 'set yrange [0:*]\n'; fi
    printf 'set key autotitle columnhead\n'
    printf 'plot for [i=2:%d] "%s" using i:xtic(1)\n' "$n" "$csv"
  } | gnuplot || die "gnuplot failed on $csv"
}

plot_cdf() {
  local csv=$1 svg=$2 title=$3 xlabel=$4
  local n i count tmp
  n=$(_plot_columns "$csv")
  tmp=$(mktemp -d /tmp/plot-cdf.XXXXXX)
  {
    _plot_head "$svg" "$title" "$xlabel" "fraction of samples"
    printf 'set yrange [0:1]\nset datafile separator whitespace\n'
    printf 'plot '
    for ((i = 1; i <= n; i++)); do
      # One sorted sample file per column, with its cumulative fraction.
      awk -F, -v c="$i" 'NR > 1 && $c != "" { print $c }' "$csv" | sort -g > "$tmp/$i.raw"
      count=$(wc -l < "$tmp/$i.raw")
      awk -v n="$count" '{ printf "%s %.6f\n", $1, NR / n }' "$tmp/$i.raw" > "$tmp/$i"
      [ "$i" -gt 1 ] && printf ', '
      printf '"%s" using 1:2 with steps lw 2 title "%s"' "$tmp/$i" "$(head -n1 "$csv" | cut -d, -f"$i")"
    done
    printf '\n'
  } | gnuplot || { rm -rf "$tmp"; die "gnuplot failed on $csv"; }
  rm -rf "$tmp"
}
