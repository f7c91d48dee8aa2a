"""Plot pydirector's ratios to direct and to HAProxy from bench/out/results.json.

Run by bench.py inside its own venv (matplotlib is the only non-stdlib import in bench/):
    bench/.venv/bin/python bench/plot.py bench/out/results.json bench/out/ratios.png
"""

import json
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, __file__.rsplit('/', 1)[0])
from bench import GOALS, METRICS, ratio  # noqa: E402


def main(json_path, png_path):
    with open(json_path) as f:
        data = json.load(f)
    table = data['summary']
    goals = {(g[0], g[1]): g for g in GOALS if g[2] == 'haproxy'}
    rows = []
    for workload, metric, label, unit, higher in METRICS:
        if metric == 'held' or workload not in table:
            continue
        to_direct = ratio(table, workload, metric, 'pydirector', 'direct')
        to_haproxy = ratio(table, workload, metric, 'pydirector', 'haproxy')
        if to_direct is None and to_haproxy is None:
            continue
        rows.append(('%s\n(%s better)' % (label, 'higher' if higher else 'lower'),
                     to_direct, to_haproxy, goals.get((workload, metric))))
    if not rows:
        print('nothing to plot: no ratios in %s' % json_path)
        return 1
    fig, ax = plt.subplots(figsize=(9, 0.75 * len(rows) + 1.5))
    ys = range(len(rows))
    height = 0.38
    # Bars grow from parity (1.0) on a log scale, so 0.5x and 2x look equally far off.
    ax.barh([y - height / 2 for y in ys], [(r[1] or 1) - 1 for r in rows], height, left=1,
            label='pydirector / direct', color='#9ecae1')
    ax.barh([y + height / 2 for y in ys], [(r[2] or 1) - 1 for r in rows], height, left=1,
            label='pydirector / HAProxy', color='#3182bd')
    for y, row in zip(ys, rows):
        for offset, value in ((-height / 2, row[1]), (height / 2, row[2])):
            if value is not None:
                ax.text(value, y + offset, ' %.2f×' % value, va='center', fontsize=8)
        goal = row[3]
        if goal:
            ax.plot([goal[4], goal[4]], [y, y + height], color='#d62728', linewidth=2)
    ax.plot([], [], color='#d62728', linewidth=2, label='target (× HAProxy)')
    ax.axvline(1.0, color='grey', linewidth=0.8)
    ax.set_xscale('log')
    values = [v for r in rows for v in r[1:3] if v] + [g[4] for g in goals.values()]
    ax.set_xlim(min(values + [0.5]) / 1.5, max(values + [2.0]) * 1.6)
    ticks = [t for t in (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks)
    ax.set_xticklabels(['%g×' % t for t in ticks])
    ax.minorticks_off()
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel('ratio of medians (log scale; 1× = parity)')
    meta = data['meta']
    ax.set_title('pydirector (Python %s) vs direct nginx and HAProxy, %s, %d cores'
                 % (meta['pydirector_python'], meta['date'][:10], meta['cores']), fontsize=10)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1], sys.argv[2]))
