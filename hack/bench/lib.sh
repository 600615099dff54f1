# shellcheck shell=bash
# Helpers shared by the benchmark scripts (source it after hack/lib/common.sh; it defines functions only).

# ratio A B: A / B as "1.23x" ("-" when B is 0 or empty).
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2fx", a / b }'; }
# median: the median of the numbers on stdin (space or newline separated).
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# rss_mib PID: resident memory in MiB.
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
# cpu_ticks PID: user + system clock ticks so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# dnsperf output parsers (stdin): queries per second, queries lost, and from `dnsperf -v` the mean and p99
# latency in microseconds ("mean_us p99_us").
qps_of() { awk '/Queries per second/ {printf "%d", $4}'; }
lost_of() { awk '/Queries lost/ {print $3}'; }
latency_of() {
  awk '/^> / {print $NF*1e6}' | sort -n |
    awk '{a[NR]=$1; s+=$1} END {if (NR==0) {print "- -"; exit} i=int(NR*0.99); if (i<1) i=1; printf "%.0f %.0f", s/NR, a[i]}'
}
