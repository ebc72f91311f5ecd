"""The report's HTML template (Jinja2): one self-contained page, findings first, no scripts, no network.

Kept as a string in a module so it ships with the package like the code that fills it.
"""
from __future__ import annotations

import logging

_logger = logging.getLogger(__name__)

__all__ = ["REPORT_TEMPLATE"]

REPORT_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{{ title }}</title>
<style>
 body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em; color: #1d1d1f; padding: 0 1em; }
 h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
 .meta { color: #555; font-size: .9em; }
 table { border-collapse: collapse; margin: .6em 0; font-size: .85em; }
 th, td { border: 1px solid #d0d0d0; padding: .25em .5em; text-align: left; vertical-align: top; }
 th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 code, .hash { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85em; word-break: break-all; }
 #findings { border: 2px solid #888; border-radius: 6px; padding: .6em 1em; margin: 1em 0; }
 #findings.has-critical { border-color: #b00020; background: #fff5f6; }
 #findings.has-warning { border-color: #b36b00; background: #fffaf0; }
 #findings.clean { border-color: #2e7d32; background: #f3fbf3; }
 .finding { margin: .4em 0; } .sev { display: inline-block; min-width: 5.5em; font-weight: bold; text-transform: uppercase; font-size: .8em; }
 .sev-critical { color: #b00020; } .sev-warning { color: #b36b00; } .sev-info { color: #1565c0; }
 .match-matched { color: #2e7d32; } .match-hash_mismatch, .match-not_sent_by_site { color: #b00020; font-weight: bold; }
 .match-not_received, .match-unverified { color: #b36b00; }
 figure { margin: .8em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
 .note { color: #555; font-size: .85em; max-width: 60em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">Generated {{ report.generated }} by {{ report.generator }} &middot; schema {{ report.schema }} v{{ report.schema_version }} &middot; kind: {{ report.kind }}</p>

{% set sev = report.findings | map(attribute="severity") | list %}
<section id="findings" class="{{ 'has-critical' if 'critical' in sev else ('has-warning' if 'warning' in sev else 'clean') }}">
<h2 style="margin-top:0">Findings</h2>
{% if not report.findings %}
<p class="finding" data-code="none">No findings: every check in this report passed.</p>
{% else %}
{% for f in report.findings %}
<p class="finding" data-severity="{{ f.severity }}" data-code="{{ f.code }}"><span class="sev sev-{{ f.severity }}">{{ f.severity }}</span> {{ f.message }}</p>
{% endfor %}
{% endif %}
</section>

{% if report.kind == "site" %}
{% set p = report.privacy %}
<h2>Site</h2>
<p>Site <b>{{ report.subject.site }}</b>; scope: {{ report.subject.scope }}; job runs: {% for j in report.subject.jobs %}<code>{{ j.job_id }}</code>{% if j.job %} ({{ j.job }}){% endif %}{% if not loop.last %}, {% endif %}{% else %}none{% endfor %}.</p>

<h2>Privacy spent at this site</h2>
<p class="note">Computed from the site's own DP ledger: each epsilon below is recomputed from the ledger's charges by the accountant, and compared with the value the ledger recorded when it charged.</p>
<table>
<tr><th>job run</th><th>DP-SGD</th><th>accountant</th><th>epsilon</th><th>delta</th><th>noise multiplier</th><th>clip norm</th><th>sampling rate</th><th>steps charged / taken</th><th>rounds charged / completed</th><th>budget left (max_epsilon)</th></tr>
{% for j in p.jobs %}
<tr><td><code>{{ j.job_id }}</code>{% if j.job %}<br>{{ j.job }}{% endif %}</td>
{% if j.dp %}
<td>on</td><td>{{ j.accountant }}</td><td class="num">{{ j.epsilon | fmt }}</td><td class="num">{{ j.delta | fmt }}</td>
<td class="num">{{ j.noise_multiplier | join_fmt }}</td><td class="num">{{ j.max_grad_norm | join_fmt }}</td><td class="num">{{ j.sample_rate | join_fmt }}</td>
<td class="num">{{ j.steps_charged }} / {{ j.steps_taken }}</td><td class="num">{{ j.rounds_charged }} / {{ j.rounds_completed }}</td>
<td class="num">{{ p.budget_left.job_left.get(j.job_id) | fmt }}</td>
{% else %}
<td><b>off</b></td><td colspan="9">no DP-SGD charge in the ledger for this job run</td>
{% endif %}</tr>
{% endfor %}
</table>
<table>
<tr><th>lifetime epsilon (all jobs)</th><th>at delta</th><th>accountant</th><th>charged rounds</th><th>lifetime budget left</th></tr>
{% if p.lifetime %}<tr><td class="num">{{ p.lifetime.epsilon | fmt }}</td><td class="num">{{ p.lifetime.delta | fmt }}</td><td>{{ p.lifetime.accountant }}</td><td class="num">{{ p.lifetime.charges }}</td><td class="num">{{ p.budget_left.lifetime_left | fmt }}</td></tr>
{% else %}<tr><td colspan="5">nothing charged yet</td></tr>{% endif %}
</table>
<h3>The site's policy (its own site.yaml)</h3>
{% if p.policy %}
<table><tr>{% for k in p.policy %}<th>privacy.{{ k }}</th>{% endfor %}</tr><tr>{% for v in p.policy.values() %}<td>{{ v | fmt }}</td>{% endfor %}</tr></table>
{% else %}<p>The site's policy was not given to this report.</p>{% endif %}
{% if plots.epsilon %}<figure><img id="plot-epsilon" alt="epsilon per round at this site" src="{{ plots.epsilon }}"><figcaption>Epsilon per round (each job) and the site's lifetime epsilon, with its caps.</figcaption></figure>{% endif %}
{% for j in p.jobs if j.refusals %}<p><b>Job {{ j.job_id }}: the site stopped contributing</b>: {% for r in j.refusals %}round {{ r.round + 1 }} ({{ r.key }}): {{ r.reason }}{% if not loop.last %}; {% endif %}{% endfor %}</p>{% endfor %}

<h2>What left this site</h2>
<p class="note">Every message the site sent, as its own log recorded it before sending: the task, round, size and SHA-256 of the payload and its form (<i>masked</i>: the secure-aggregation masked update; <i>protocol</i>: a key-exchange, signature or unmask-share message; <i>clear</i>: an update sent without secure aggregation; <i>failure</i>: an error or a refusal). Matched hash by hash against the server's received log where available. Log chain intact: <b>{{ 'yes' if report.messages.chain_intact else 'NO' }}</b>. By match: {% for k, v in report.messages.by_match.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% else %}no messages{% endfor %}.</p>
{% if plots.bytes %}<figure><img id="plot-bytes" alt="bytes sent per round" src="{{ plots.bytes }}"><figcaption>Bytes sent per round.</figcaption></figure>{% endif %}
<table>
<tr><th>#</th><th>time (UTC)</th><th>job run</th><th>task</th><th>round</th><th>bytes</th><th>form</th><th>values beside the payload</th><th>SHA-256 of the payload</th><th>server's log</th></tr>
{% for m in report.messages['items'] %}
<tr><td class="num">{{ m.seq if m.seq is not none else '' }}</td><td>{{ m.time }}</td><td><code>{{ m.job_id }}</code></td><td>{{ m.task }}</td><td class="num">{{ m.round + 1 }}</td><td class="num">{{ m.bytes }}</td><td>{{ m.form }}</td><td>{{ m.clear_fields | join(", ") }}</td><td class="hash">{{ m.sha256 }}{% if m.match == "hash_mismatch" %}<br>server: {{ m.server_sha256 }}{% endif %}</td><td class="match-{{ m.match }}">{{ m.match }}</td></tr>
{% endfor %}
</table>

<h2>The site's own figures per round (kept at the site)</h2>
<table><tr><th>job run</th><th>round</th><th>loss</th><th>images</th><th>steps</th><th>masked</th><th>clipped coordinates</th><th>epsilon after</th></tr>
{% for f in report.rounds %}<tr><td><code>{{ f.job_id }}</code></td><td class="num">{{ f.round + 1 }}</td><td class="num">{{ f.loss | fmt }}</td><td class="num">{{ f.num_samples }}</td><td class="num">{{ f.steps }}</td><td>{{ f.masked }}</td><td class="num">{{ f.clipped_coordinates }}</td><td class="num">{{ f.epsilon | fmt }}</td></tr>
{% else %}<tr><td colspan="8">no round recorded</td></tr>{% endfor %}</table>

<h2>Ingestion (counts only)</h2>
{% set ing = report.ingestion %}
<p>Images in the cache: <b>{{ ing.images_in_cache if ing.images_in_cache is not none else 'unknown' }}</b>.
{% if ing.last_run %} Last ingest run: {{ ing.last_run.files_seen }} files seen, {{ ing.last_run.added }} added ({{ ing.last_run.images_written }} images), {{ ing.last_run.skipped_existing }} already cached.{% endif %}</p>
<table><tr><th>files not used, by reason</th><th>count</th></tr>
{% for reason, n in (ing.not_used_by_reason or {}).items() %}<tr><td>{{ reason }}</td><td class="num">{{ n }}</td></tr>{% else %}<tr><td colspan="2">none</td></tr>{% endfor %}</table>
<p class="note">File names and paths are not in this report: they stay in the LOCAL list beside the cache, for the site's IT.</p>
{% endif %}

{% if report.kind == "server" %}
{% set s = report.subject %}
<h2>Job</h2>
<table>
<tr><th>job id</th><td><code>{{ s.job_id }}</code></td></tr><tr><th>job</th><td>{{ s.job }}</td></tr><tr><th>status</th><td>{{ s.status }}</td></tr>
<tr><th>submitted by</th><td>{{ s.submitted_by }}{% if s.submitter_org %} ({{ s.submitter_org }}, {{ s.submitter_role }}){% endif %}</td></tr>
<tr><th>submitted at</th><td>{{ s.submitted_at }}</td></tr><tr><th>rounds</th><td>{{ s.rounds_recorded }} recorded of {{ s.num_rounds }}</td></tr>
<tr><th>secure aggregation</th><td>{{ s.secure_aggregation }}</td></tr><tr><th>min sites</th><td>{{ s.min_sites }}</td></tr>
<tr><th>DP-SGD (the job's request; each site's epsilon is in its own report)</th><td>{% if s.dp %}{{ 'on' if s.dp.enabled else 'OFF' }}{% if s.dp.enabled %}: target epsilon {{ s.dp.target_epsilon | fmt }}, noise {{ s.dp.noise_multiplier | fmt }}, clip norm {{ s.dp.max_grad_norm | fmt }}, {{ s.dp.accountant }}{% endif %}{% else %}unknown{% endif %}</td></tr>
</table>

<h2>Rounds (aggregates only)</h2>
{% if plots.participation %}<figure><img id="plot-participation" alt="participants and dropouts per round" src="{{ plots.participation }}"><figcaption>Participants and dropouts per round, with the unmask threshold.</figcaption></figure>{% endif %}
{% if plots.bytes %}<figure><img id="plot-bytes" alt="bytes received per round" src="{{ plots.bytes }}"><figcaption>Bytes received per round (all tasks, from the server's received log).</figcaption></figure>{% endif %}
<table>
<tr><th>round</th><th>applied</th><th>secure aggregation</th><th>participants</th><th>dropouts (reason)</th><th>recovered</th><th>threshold t</th><th>mean loss</th><th>images</th><th>steps</th><th>bytes received</th></tr>
{% for r in report.rounds %}
<tr><td class="num">{{ r.round + 1 }}</td><td>{{ r.applied }}</td><td>{{ r.secure_aggregation }}</td><td>{{ r.participants | join(", ") }}</td>
<td>{% for d in r.dropouts %}{{ d.site }} ({{ d.reason }}){% if not loop.last %}<br>{% endif %}{% endfor %}</td><td>{{ r.recovered | join(", ") }}</td>
<td class="num">{{ r.threshold if r.threshold is not none else '' }}</td><td class="num">{{ r.aggregate.global_loss | fmt }}</td><td class="num">{{ r.aggregate.total_images | fmt }}</td><td class="num">{{ r.aggregate.total_steps | fmt }}</td><td class="num">{{ r.bytes_received }}</td></tr>
{% else %}<tr><td colspan="11">no round recorded</td></tr>{% endfor %}
</table>

<h2>What the server received</h2>
<p class="note">Every reply as the server logged it on arrival, before using it. Log chain intact: <b>{{ 'yes' if report.received.chain_intact else 'NO' }}</b>. Sites match these hashes against their own outgoing logs (<code>ultrafedfm audit --site KIT --server-report report.json</code>).</p>
<table><tr><th>#</th><th>time (UTC)</th><th>site</th><th>task</th><th>round</th><th>bytes</th><th>form</th><th>SHA-256 of the payload</th></tr>
{% for m in report.received['items'] %}<tr><td class="num">{{ m.seq }}</td><td>{{ m.time }}</td><td>{{ m.site }}</td><td>{{ m.task }}</td><td class="num">{{ m.round + 1 }}</td><td class="num">{{ m.bytes }}</td><td>{{ m.form }}</td><td class="hash">{{ m.sha256 }}</td></tr>
{% else %}<tr><td colspan="8">no received-payload log</td></tr>{% endfor %}</table>

<h2>FLARE's audit events for this job</h2>
<p>Submitted by <b>{{ report.flare_audit.submitted_by }}</b> at {{ report.flare_audit.submitted_at }} (FLARE's job meta).</p>
<table><tr><th>time (server clock)</th><th>user</th><th>action</th><th>log</th></tr>
{% for e in report.flare_audit.events %}<tr><td>{{ e.time }}</td><td>{{ e.user or e.job }}</td><td><code>{{ e.action }}</code></td><td>{{ e.source }}</td></tr>{% else %}<tr><td colspan="4">no audit event found</td></tr>{% endfor %}</table>
{% endif %}

{% if report.kind in ("site", "server") %}
<h2>Transport</h2>
<table><tr><th>certificate</th><th>subject</th><th>issuing CA</th><th>SHA-256 fingerprint</th><th>expires</th><th>days left</th></tr>
{% for c in report.transport.certificates %}<tr><td><code>{{ c.file }}</code></td><td>{{ c.subject }}</td><td>{{ c.issuer }}</td><td class="hash">{{ c.fingerprint_sha256 }}</td><td>{{ c.not_after }}</td><td class="num">{{ c.days_left }}</td></tr>
{% else %}<tr><td colspan="6">no certificate found (no kit given, or no startup/ folder in it): not checked</td></tr>{% endfor %}</table>
{% set mem = report.transport.membership %}
{% if mem and not mem.get('error') %}<p>Secure-aggregation member list v{{ mem.version }} of <b>{{ mem.consortium }}</b>: {{ mem.size }} member sites (threshold t = {{ mem.threshold }}), signed by admin key <code>{{ mem.admin_fingerprint }}</code>.</p>
<table><tr><th>member site</th><th>key fingerprint (compare by phone)</th></tr>{% for m in mem.members %}<tr><td>{{ m.name }}</td><td class="hash">{{ m.fingerprint }}</td></tr>{% endfor %}</table>
{% elif mem %}<p>Member list: {{ mem.error }}</p>{% endif %}
{% endif %}

{% if report.kind == "empirical" %}
<h2>Membership inference on canaries (one training run)</h2>
<p class="note">{{ report.canary_audit.method }}</p>
{% if plots.empirical %}<figure><img id="plot-empirical" alt="empirical lower bounds beside the accountant" src="{{ plots.empirical }}"><figcaption>The empirical lower bound (what the attack proves) beside the accountant's epsilon (what DP-SGD guarantees).</figcaption></figure>{% endif %}
<table><tr><th>run</th><th>DP-SGD</th><th>accountant epsilon (delta)</th><th>empirical lower bound (95 %)</th><th>canaries (inserted)</th><th>guesses</th><th>correct</th><th>membership AUC</th></tr>
{% for r in report.canary_audit.runs %}<tr><td>{{ r.label }}</td><td>{{ 'on' if r.dp else 'off' }}</td><td class="num">{{ r.epsilon_accountant | fmt }} ({{ r.delta | fmt }})</td><td class="num">{{ r.epsilon_lower_bound | fmt }}</td><td class="num">{{ r.canaries }} ({{ r.inserted }})</td><td class="num">{{ r.guesses }}</td><td class="num">{{ r.correct }}</td><td class="num">{{ r.auc | fmt }}</td></tr>{% endfor %}</table>
<h2>Gradient inversion on one upload</h2>
<p class="note">{{ report.inversion.method }}</p>
<table><tr><th>what the attacker holds</th><th>similarity to the true image</th><th>similarity to other images (chance): mean &plusmn; sd</th><th>mean rank of the true image (1: closest)</th><th>p-value (vs. chance)</th></tr>
{% for r in report.inversion.attacks %}<tr><td>{{ r.label }}</td><td class="num">{{ r.similarity | fmt }}</td><td class="num">{{ r.chance_mean | fmt }} &plusmn; {{ r.chance_sd | fmt }}</td><td class="num">{{ r.rank | fmt }} of {{ r.candidates }}</td><td class="num">{{ r.p_value | fmt }}</td></tr>{% endfor %}</table>
{% endif %}

<h2>Inputs this report was computed from</h2>
<p class="note">Anyone holding these files can recompute every figure above; the SHA-256 says it is the same file.</p>
<table><tr><th>input</th><th>file</th><th>bytes</th><th>SHA-256</th></tr>
{% for s in report.sources %}<tr><td>{{ s.role }}</td><td><code>{{ s.name }}</code></td><td class="num">{{ s.bytes }}</td><td class="hash">{{ s.sha256 }}</td></tr>{% else %}<tr><td colspan="4">none</td></tr>{% endfor %}</table>
</body>
</html>
"""
