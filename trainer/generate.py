"""Deterministic generator of labelled task-mining logs (the `tagger generate` command).

This module owns the synthetic logs, in three profiles (`PROFILES`):

* `default`: the customs / duty-invoice back-office process of the seed's log: its steps,
  the event templates each step emits, the transitions between steps, and how a walk
  through it is written out as a CSV (plus, optionally, one small PNG screenshot per event);
* `window-focus`: a window-focus log of one office worker (`tagger generate --profile
  window-focus`), described at the end of this docstring;
* `window-focus-hard`: the same with titles that say less about the activity (windows
  borrowed from related activities and shared windows are more common), so that a CRF over
  each event +-2 scores about 0.43 macro-F1 rather than 0.68, nearer the 0.38 it scores on
  the real window-focus log DATA.md describes. It gets there another way than that log
  does: a title's majority activity covers 60% of its events, against 74% there and in
  `window-focus`. A stress test of the regime where the neighbours must carry the label,
  not a replica.

The default profile's logs are meant to be hard in the ways the seed's log is (see DATA.md):

* the same event name belongs to several steps (`... IAS.tpx ... in Terminal` is Paperwork
  in one place and an invoice step in another), so a per-event classifier cannot be sure;
* the two invoice steps, `Account Update Duty Invoice` and `No Account Update Duty Invoice`,
  start with the same events drawn from the same distribution (`INVOICE_HEAD`); only later
  events (the account-maintenance screen vs the "no change" confirmation) say which one it
  was, so a live tagger has to revise labels it already emitted;
* identifiers (10-digit accounts, case codes, invoice numbers) are drawn per case and recur
  across apps within a step; some event names contain commas and Windows paths;
* timestamps tie within a second (`.001000` suffixes), file order disagrees with timestamp
  order for a few percent of rows, and a few sessions are interleaved in the file;
* `Out of Process` is rare (well under 1% of events) and partly shares event names with
  real steps; a handful of events have no `Prefix:` at all.

The true order of a session is timestamp order (ties broken by the sub-second suffix); the
file order is deliberately perturbed. Output is byte-identical for a given seed: every random
draw comes from a `random.Random` seeded from (seed, session), never from global state or the
clock, and images use their own per-event streams so turning images on does not change the CSV.

The `window-focus` profile follows DATA.md's "What a real window-focus log looks like". A
session is a working day (`wf<seed>-<date>`; 20 days by default, about 10,000 events, median
450 a day) and a row is a focus change: `event_name` is `Focus: <window title> in <app>`,
with `target_app`, the title as `text`, and `duration_s`. Labels are 28 job activities
(`ACTIVITIES`, read from the catalogue `window_focus.yaml` beside this module with the
windows of each; the largest 13.5% of events, nine under 1%, one only in the last days), about
7 a day, in runs of one activity (median 5 events, mean about 22) that interleave and return.
It is hard in these ways:

* titles carry the activity in their words (project, document, person and customer names,
  mail subjects), but most titles are seen on one day only, and the words drift: documents
  get new versions and weeks, threads and tickets start and retire, topics move on;
* 34 apps, most events in the browser, and the app alone says little about the activity;
* shared windows (`WF_SHARED`: the inbox, the desktop, a new tab, how-to searches, chats
  with the team) and tool start pages carry no word of the activity: they belong to
  whichever run they sit in, so a per-event classifier cannot get them right but the
  neighbouring events can;
* timestamps have one-minute resolution and most events tie with the one before, so the
  file order is the only order; `duration_s` is the time to the next focus change at that
  resolution (mostly 0).

Its draws come from a plan stream and one stream per day, seeded from (seed, day), so it is
byte-identical for a given seed as well.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from statistics import NormalDist

import pandas as pd
import yaml
from tqdm import tqdm

from trainer.errors import ConfigError

__all__ = ["generate", "STEPS", "COLUMNS", "PROFILES", "ACTIVITIES", "WF_COLUMNS"]

PROFILES = ("default", "window-focus", "window-focus-hard")

COLUMNS = ["timestamp", "session_id", "event_name", "group_id", "target_app", "text",
           "duration_s", "step_name"]
IMAGE_COLUMN = "screenshot_path"

LOOKUP = "Look Up Customer Account"
PAPERWORK = "Paperwork"
ACCOUNT_UPDATE = "Account Update Duty Invoice"
NO_ACCOUNT_UPDATE = "No Account Update Duty Invoice"
FEES = "Additional Fees"
EMAIL = "Email Customer"
SHEET = "Update Team's Sheet"
OUT_OF_PROCESS = "Out of Process"
STEPS = (LOOKUP, PAPERWORK, ACCOUNT_UPDATE, NO_ACCOUNT_UPDATE, FEES, EMAIL, SHEET,
         OUT_OF_PROCESS)

# The recording window: 19 days starting on a Monday, in the agents' +05:00 local time.
_TZ = timezone(timedelta(hours=5))
_FIRST_DAY = datetime(2024, 5, 20, tzinfo=_TZ)
_DAYS = 19


# --------------------------------------------------------------------------------------
# The process as data: templates -> slots -> steps -> transitions
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """One kind of event. `target`, `window` and `notes` are format strings over the case's
    identifiers (`{acct}`, `{code}`, `{inv}`, ...)."""
    prefix: str            # "Read", "Write", "Action", "Action*" or "" (no prefix)
    target: str
    app: str
    window: str            # the UI window: title bar text, and what group_id hashes
    screen: str            # screenshot layout, see _Renderer
    notes: tuple[str, ...] = ()   # what a `text` cell may hold besides the window title
    dur: float = 2.0       # median seconds spent on the event


@dataclass(frozen=True)
class Slot:
    """A place in a step: present with probability `p`, repeated up to `max_repeat` times,
    each time one of `choices` (weighted)."""
    choices: tuple[Template, ...]
    weights: tuple[float, ...] | None = None
    p: float = 1.0
    max_repeat: int = 1


@dataclass(frozen=True)
class Step:
    name: str
    slots: tuple[Slot, ...]
    # The first `head` slots keep their order; later events may swap with a neighbour. The
    # invoice steps need this so their shared opening stays identically distributed.
    head: int = 0
    dur_scale: float = 1.0


def S(*choices: Template, p: float = 1.0, rep: int = 1,
      w: tuple[float, ...] | None = None) -> Slot:
    return Slot(tuple(choices), w, p, rep)


DESK = r"C:\Users\agent\Desktop"
DOWNLOADS = r"C:\Users\agent\Downloads"
SHEET_FILE = "Agent Cash Duty Week Ending {week}.xlsx"
PDF_WINDOW = "{inv}.pdf - Adobe Acrobat Reader"
TERMINAL = "IAS.tpx - Terminal"
IBBR_INQUIRY = "IBBR - IBS Customer Master File Inquiry"
IBBR_DETAIL = "IBBR - Account Detail"

# Templates used by more than one step are named; that sharing is the point.
IAS_TPX = Template("Action*", DESK + r"\IAS.tpx ...", "Terminal", TERMINAL, "terminal",
                   ("IAS session", "connect host", "{acct}"), 3.0)
SELECT_EXCEL = Template("Action", "Select Excel", "dpdhl.sharepoint", "Duty Team - SharePoint",
                        "list", ("open in app", "Duty Team"), 1.5)
READ_CASE_SP = Template("Read", "{acct} . {code} .", "dpdhl.sharepoint",
                        "Duty Cases - SharePoint", "list", ("{acct}", "case {code}"), 2.5)
WRITE_CASE_CHROME = Template("Write", "{acct} . {code} .", "Chrome", "Customs Portal - Chrome",
                             "form", ("{acct} | {code}", "account no"), 4.0)
AVPAGE = Template("Write", "AVPageView", "Acrobat Reader", PDF_WINDOW, "pdf",
                  ("page 1", "page 2", "zoom"), 1.8)
READ_AMT_TERM = Template("Read", "{amt}", "Terminal", TERMINAL, "terminal",
                         ("amount due", "{amt}", "total"), 2.2)
REISSUE = Template("Action*", "Reissue Duty Invoice", "Terminal", TERMINAL, "terminal",
                   ("reissue", "print invoice"), 2.0)
XL_CUST = Template("Write", "{cust}", "Excel", SHEET_FILE + " - Excel", "grid",
                   ("{cust}", "customer"), 3.5)
XL_AMT = Template("Write", "{amt}", "Excel", SHEET_FILE + " - Excel", "grid",
                  ("{amt}", "amount"), 3.0)
INBOX = Template("Action*", "Inbox", "Outlook", "Inbox - Outlook", "mail",
                 ("Inbox", "unread"), 1.5)
NEW_TAB = Template("Action*", "New Tab", "Chrome", "New Tab - Chrome", "web", ("new tab",), 1.0)
PDF_OPEN = Template("Action*", DOWNLOADS + r"\{inv}.pdf", "Acrobat Reader", PDF_WINDOW, "pdf",
                    ("{inv}.pdf", "invoice copy"), 2.5)

LOOKUP_STEP = Step(LOOKUP, (
    S(Template("Action*", IBBR_INQUIRY, "ibbr-global.dhl", IBBR_INQUIRY, "form",
               ("customer master", "inquiry"), 2.0), p=.8),
    S(Template("Write", "{inv}", "ibbr-global.dhl", IBBR_INQUIRY, "form",
               ("invoice no", "{inv}"), 3.5),
      Template("Write", "{acct}", "ibbr-global.dhl", IBBR_INQUIRY, "form",
               ("account no", "{acct}"), 3.5), w=(.6, .4), p=.9, rep=2),
    S(Template("Action*", "DP,PA", "ibbr-global.dhl", IBBR_DETAIL, "form",
               ("DP,PA", "duty paid, pre-alert"), 1.5), p=.7),
    S(Template("Action", "Account Details", "ibbr-global.dhl", IBBR_DETAIL, "form",
               ("details",), 1.5), p=.5),
    S(Template("Read", "{cust}", "ibbr-global.dhl", IBBR_DETAIL, "form",
               ("{cust}", "consignee"), 2.5),
      Template("Read", "{street}", "ibbr-global.dhl", IBBR_DETAIL, "form",
               ("{addr_note}", "{street}"), 3.0), p=.75, rep=2),
    S(READ_CASE_SP, p=.2),
    S(IAS_TPX, p=.1),
), dur_scale=1.0)

PAPERWORK_STEP = Step(PAPERWORK, (
    S(IAS_TPX, p=.6),
    S(READ_CASE_SP, p=.8),
    S(WRITE_CASE_CHROME, p=.7),
    S(Template("Write", "{awb}", "Chrome", "Shipment Tracking - Chrome", "form",
               ("waybill", "{awb}"), 3.5), p=.4),
    S(PDF_OPEN, p=.5),
    S(AVPAGE, p=.8, rep=3),
    S(Template("Write", "{d} {acct4}", "Acrobat Reader", PDF_WINDOW, "pdf",
               ("find", "{acct4}"), 2.5), p=.6),
    S(Template("Action", "Print", "Acrobat Reader", PDF_WINDOW, "pdf", ("print",), 1.2),
      Template("Action*", DESK + r"\Scans", "Explorer", "Scans - File Explorer", "desktop",
               ("scanned docs",), 2.0), p=.3),
), dur_scale=1.1)

# The opening both invoice steps share. Everything about these events (names, windows,
# text, durations, screenshots) is drawn the same way for both branches.
INVOICE_HEAD = (
    S(IAS_TPX, p=.85),
    S(SELECT_EXCEL, p=.7),
    S(READ_CASE_SP, p=.45),
    S(Template("Write", "{acct}", "Terminal", TERMINAL, "terminal", ("{acct}", "acct"), 3.0),
      p=.8),
    S(Template("Action*", "Duty Invoice Inquiry", "Terminal", TERMINAL, "terminal",
               ("inquiry", "duty inv"), 1.8), p=.6),
    S(Template("Read", "{inv}", "Terminal", TERMINAL, "terminal", ("{inv}",), 2.0), p=.5),
)
MAINTENANCE = "IAS.tpx - Account Maintenance"
CONFIRMATION = "IAS.tpx - Invoice Confirmation"

# What reveals an account update: the maintenance screen and the address being typed in.
ACCOUNT_UPDATE_STEP = Step(ACCOUNT_UPDATE, INVOICE_HEAD + (
    S(Template("Action*", "F6 Account Maintenance", "Terminal", MAINTENANCE, "terminal_update",
               ("F6", "maint", "update address"), 2.0), p=.85),
    S(Template("Write", "{street}", "Terminal", MAINTENANCE, "terminal_update",
               ("{street}", "new address"), 5.0),
      Template("Write", "{zip}", "Terminal", MAINTENANCE, "terminal_update",
               ("zip", "{zip}"), 3.0), p=.8, rep=3),
    S(Template("Action*", "Update Account Record", "Terminal", MAINTENANCE, "terminal_update",
               ("saved", "record updated"), 1.5), p=.75),
    S(WRITE_CASE_CHROME, p=.3),
    S(REISSUE, p=.6),
), head=len(INVOICE_HEAD), dur_scale=1.2)

# What reveals no update: the confirmation screen. Reading the amount and reissuing are
# shared with other steps, so they do not reveal anything on their own.
NO_ACCOUNT_UPDATE_STEP = Step(NO_ACCOUNT_UPDATE, INVOICE_HEAD + (
    S(Template("Action*", "Invoice Confirmation - No Change", "Terminal", CONFIRMATION,
               "terminal_nochange", ("no change", "confirm"), 1.8), p=.8),
    S(Template("Write", "N", "Terminal", CONFIRMATION, "terminal_nochange",
               ("N", "no"), 1.0), p=.6),
    S(READ_AMT_TERM, p=.5),
    S(REISSUE, p=.6),
), head=len(INVOICE_HEAD), dur_scale=1.2)

FEES_STEP = Step(FEES, (
    S(XL_CUST, p=.7),
    S(Template("Action*", "Fee Schedule", "dpdhl.sharepoint", "Fee Schedule - SharePoint",
               "list", ("fee schedule", "rates"), 2.5), p=.5),
    S(AVPAGE, p=.3),
    S(Template("Action*", "Storage, Disbursement", "ibbr-global.dhl", "IBBR - Charges",
               "form", ("storage, disbursement", "charges"), 2.0), p=.6),
    S(Template("Write", "{fee}", "ibbr-global.dhl", "IBBR - Charges", "form",
               ("fee code", "{fee}"), 2.5), p=.5),
    S(XL_AMT, p=.7, rep=2),
    S(READ_AMT_TERM, p=.3),
), dur_scale=0.9)

EMAIL_STEP = Step(EMAIL, (
    S(INBOX, p=.8),
    S(Template("Action", "New Email", "Outlook", "Inbox - Outlook", "mail", ("new",), 1.2),
      p=.7),
    S(Template("Write", "{cust}", "Outlook", "Untitled - Message", "compose",
               ("To: {cust}",), 3.0), p=.7),
    S(Template("Write", "Duty Invoice {inv}", "Outlook", "Untitled - Message", "compose",
               ("subject", "Duty Invoice {inv}"), 4.0), p=.6),
    S(Template("Action*", DOWNLOADS + r"\{inv}.pdf", "Outlook",
               "Duty Invoice {inv} - Message", "compose", ("attach",), 2.0), p=.5),
    S(Template("Action", "Send", "Outlook", "Duty Invoice {inv} - Message", "compose",
               ("sent",), 1.0), p=.85),
), dur_scale=1.3)

SHEET_STEP = Step(SHEET, (
    S(SELECT_EXCEL, p=.5),
    S(Template("Action*", SHEET_FILE, "dpdhl.sharepoint", "Duty Team - SharePoint", "list",
               ("weekly sheet", SHEET_FILE), 2.0),
      Template("Action*", DESK + "\\" + SHEET_FILE, "Excel", SHEET_FILE + " - Excel", "grid",
               ("weekly sheet",), 2.0), w=(.7, .3), p=.85),
    S(Template("Write", ". {code2} .", "Chrome", "Customs Portal - Chrome", "form",
               ("{code2}", "case ref"), 3.0), p=.5),
    S(Template("Write", "{acct}", "Excel", SHEET_FILE + " - Excel", "grid",
               ("{acct}", "account"), 3.0), p=.7),
    S(XL_AMT, p=.6, rep=2),
    S(XL_CUST, p=.3),
    S(Template("Action", "Save", "Excel", SHEET_FILE + " - Excel", "grid", ("saved",), 1.0),
      p=.5),
), dur_scale=1.0)

# Out of Process: private or unrelated activity, mostly Write and Action*. Some names are
# also used by real steps (Inbox, New Tab), so the event name alone does not give it away.
OUT_OF_PROCESS_EVENTS = (
    Template("Write", "{chat}", "Teams", "Chat - Microsoft Teams", "web", ("{chat}",), 4.0),
    Template("Action*", "Microsoft Teams", "Teams", "Chat - Microsoft Teams", "web",
             ("chat",), 1.5),
    Template("Action*", "YouTube", "Chrome", "YouTube - Chrome", "web", ("video",), 6.0),
    Template("Write", "{search}", "Chrome", "Google - Chrome", "web", ("{search}",), 3.5),
    INBOX,
    NEW_TAB,
    Template("Read", "Calendar", "Outlook", "Calendar - Outlook", "mail", ("meeting",), 2.0),
)
OUT_OF_PROCESS_WEIGHTS = (.3, .15, .12, .2, .1, .08, .05)

# Navigation that happens inside any step and is labelled with that step.
GENERIC_EVENTS = (
    NEW_TAB,
    Template("Action", "Alt+Tab", "Explorer", "Task Switching", "desktop", (), 0.8),
    Template("Action*", "Desktop", "Explorer", "Desktop", "desktop", (), 1.0),
    Template("Read", "{acct}", "Chrome", "Customs Portal - Chrome", "form", ("{acct}",), 2.0),
)
# The few events the recorder writes without a `Prefix:`; one starts with a drive letter,
# so splitting on the first colon is wrong.
NO_PREFIX_EVENTS = (
    Template("", "Task Switching", "Explorer", "Task Switching", "desktop"),
    Template("", DESK, "Explorer", "Desktop", "desktop"),
    Template("", "Start", "Explorer", "Start", "desktop"),
)

STEP_OF = {s.name: s for s in (LOOKUP_STEP, PAPERWORK_STEP, ACCOUNT_UPDATE_STEP,
                               NO_ACCOUNT_UPDATE_STEP, FEES_STEP, EMAIL_STEP, SHEET_STEP)}

# Transitions between process states. "Invoice" resolves to one of the two invoice steps by
# the case's hidden `needs_update`; "new case" starts over with fresh identifiers.
_START, _END, _INVOICE, _NEW_CASE = "<start>", "<end>", "<invoice>", "<new case>"
TRANSITIONS: dict[str, tuple[tuple[str, float], ...]] = {
    _START: ((LOOKUP, .5), (PAPERWORK, .22), (_INVOICE, .1), (FEES, .05), (SHEET, .08),
             (EMAIL, .05)),
    LOOKUP: ((PAPERWORK, .64), (_INVOICE, .12), (LOOKUP, .06), (_END, .18)),
    PAPERWORK: ((_INVOICE, .68), (FEES, .08), (LOOKUP, .06), (PAPERWORK, .04), (_END, .14)),
    _INVOICE: ((FEES, .28), (SHEET, .34), (EMAIL, .12), (_END, .26)),
    FEES: ((SHEET, .55), (EMAIL, .12), (LOOKUP, .08), (_END, .25)),
    EMAIL: ((SHEET, .45), (_END, .55)),
    SHEET: ((_END, .68), (_NEW_CASE, .32)),
}
P_NEEDS_UPDATE = 0.6
P_GENERIC = 0.05          # chance of a navigation event after each step event
P_NO_PREFIX = 0.0007      # chance of a prefix-less event after each step event
P_OOP_BURST = 0.055       # chance a session contains an Out of Process burst
P_TIE = 0.12              # chance the next event falls in the same second
P_SWAP_TIE, P_SWAP = 0.2, 0.01   # file-order swaps of adjacent rows
P_INTERLEAVE = 0.03       # chance a session's rows are riffled with the next session's
P_MISSING_DURATION = 0.01
MAX_EVENTS = 240

CUSTOMERS = ("Komax", "Siemens Healthineers", "Bosch Rexroth", "Atlas Copco", "Sandvik",
             "Hilti", "Festo", "Endress+Hauser", "Zeiss", "Trumpf", "Sika", "Schott",
             "Brenntag", "Heraeus", "Wurth", "Smith, Jones & Co", "Acme Imports, LLC",
             "Nordic Parts", "Orion Textiles", "Kappa Pharma", "Lumen Optics",
             "Delta Marine Supply", "Gulf Agro Traders", "Vertex Tools")
STREETS = ("MAIN ST", "KING RD", "HARBOUR AVE", "MILL LN", "PARK BLVD", "STATION RD",
           "MARKET ST", "RIVER DR", "CANAL ST", "AIRPORT RD")
FEE_CODES = ("DTP", "SFC", "BRK", "STG", "DIS", "ADV")
CHATS = ("ok", "on my way", "lunch?", "thanks!", "will check", "brb", "call me", "sure, 5 min")
SEARCHES = ("weather", "cricket score", "flight status", "news", "currency rate",
            "train times")
GENERIC_NOTES = ("ok", "checking", "see email", "pending", "done", "tbd", "copy", "paste",
                 "waiting for customer", "per supervisor", "ok, next")


# --------------------------------------------------------------------------------------
# Walking the process
# --------------------------------------------------------------------------------------

def _choose(rng: random.Random, pairs) -> str:
    r = rng.random() * sum(w for _, w in pairs)
    for value, w in pairs:
        r -= w
        if r < 0:
            return value
    return pairs[-1][0]


def _new_case(rng: random.Random, week: str) -> dict[str, str]:
    acct = str(rng.randrange(10 ** 9, 10 ** 10))
    digits = f"{rng.randrange(1000):03d}"
    letters = "ABCDEFGHJKLMNPRSTUVW"
    first = rng.choice(letters)
    needs_update = rng.random() < P_NEEDS_UPDATE
    # A weak hint, readable earlier in the session, of which invoice branch comes later.
    addr_note = rng.choices(("address mismatch", "new address on file", "address ok"),
                            (.45, .3, .25) if needs_update else (.1, .1, .8))[0]
    return {
        "acct": acct, "acct4": acct[-4:], "d": str(rng.randrange(1, 10)),
        "code": first + digits,
        "code2": rng.choice(letters.replace(first, "")) + digits,
        "inv": str(rng.randrange(10 ** 8, 10 ** 9)),
        "awb": str(rng.randrange(10 ** 9, 10 ** 10)),
        "cust": rng.choice(CUSTOMERS),
        "amt": f"{rng.lognormvariate(math.log(180), .9):.2f}",
        "street": f"{rng.randrange(1, 999)} {rng.choice(STREETS)}",
        "zip": f"{rng.randrange(10000, 99999)}",
        "fee": rng.choice(FEE_CODES),
        "chat": rng.choice(CHATS), "search": rng.choice(SEARCHES),
        "week": week, "addr_note": addr_note,
        "needs_update": "1" if needs_update else "",
    }


# One generated event before it is formatted: (template, step name, case identifiers).
_Ev = tuple[Template, str, dict]


def _walk_step(rng: random.Random, step: Step, case: dict, repeat_p: float) -> list[_Ev]:
    head: list[_Ev] = []
    body: list[_Ev] = []
    for i, slot in enumerate(step.slots):
        if rng.random() >= slot.p:
            continue
        n = 1
        while n < slot.max_repeat and rng.random() < repeat_p:
            n += 1
        for _ in range(n):
            tpl = (slot.choices[0] if len(slot.choices) == 1
                   else rng.choices(slot.choices, slot.weights)[0])
            out = head if i < step.head else body
            out.append((tpl, step.name, case))
            # Noise events drawn the same way in every step (so the shared invoice opening
            # stays identical in distribution across the two branches).
            if rng.random() < P_GENERIC:
                out.append((rng.choice(GENERIC_EVENTS), step.name, case))
            if rng.random() < P_NO_PREFIX:
                out.append((rng.choice(NO_PREFIX_EVENTS), step.name, case))
    # Agents do not always follow the same order inside a step.
    for j in range(len(body) - 1):
        if rng.random() < 0.08:
            body[j], body[j + 1] = body[j + 1], body[j]
    return head + body


def _walk_session(rng: random.Random, week: str) -> list[_Ev]:
    """A walk through the process from the start state to the end state."""
    repeat_p = 0.7 if rng.random() < 0.1 else 0.35   # some agents click a lot more
    case = _new_case(rng, week)
    events: list[_Ev] = []
    state = _choose(rng, TRANSITIONS[_START])
    first = True
    while state != _END and len(events) < MAX_EVENTS:
        if state == _NEW_CASE:
            case = _new_case(rng, week)
            state = LOOKUP
        name = state
        if state == _INVOICE:
            name = ACCOUNT_UPDATE if case["needs_update"] else NO_ACCOUNT_UPDATE
        evs = _walk_step(rng, STEP_OF[name], case, repeat_p)
        # Recording may start in the middle of a step.
        if first and state != LOOKUP and len(evs) > 2 and rng.random() < 0.4:
            evs = evs[rng.randrange(1, len(evs) // 2 + 1):]
        first = False
        events.extend(evs)
        state = _choose(rng, TRANSITIONS[state])
    # ...and may stop in the middle of one.
    if len(events) > 3 and rng.random() < 0.05:
        events = events[:len(events) - rng.randrange(1, 3)]
    if rng.random() < P_OOP_BURST:
        burst = 1
        while burst < 5 and rng.random() < 0.5:
            burst += 1
        at = rng.randrange(len(events) + 1)
        oop = [(rng.choices(OUT_OF_PROCESS_EVENTS, OUT_OF_PROCESS_WEIGHTS)[0], OUT_OF_PROCESS,
                case) for _ in range(burst)]
        events[at:at] = oop
    return events[:MAX_EVENTS]


def _session_start(rng: random.Random) -> tuple[int, str]:
    """Seconds since _FIRST_DAY of a work-day start time, and that week's 'week ending'."""
    day = rng.choices(range(_DAYS),
                      [(1.0 if (_FIRST_DAY + timedelta(d)).weekday() < 5 else
                        0.25 if (_FIRST_DAY + timedelta(d)).weekday() == 5 else 0.08)
                       for d in range(_DAYS)])[0]
    # Morning and afternoon peaks of a work day, local time.
    hour = rng.gauss(11.0, 1.6) if rng.random() < 0.5 else rng.gauss(15.5, 1.8)
    hour = min(max(hour, 7.0), 21.5)
    secs = day * 86400 + int(hour * 3600)
    date = _FIRST_DAY + timedelta(days=day)
    friday = date + timedelta(days=(4 - date.weekday()) % 7)
    return secs, f"{friday.month}-{friday.day}-{friday.year}"


# --------------------------------------------------------------------------------------
# Formatting rows
# --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def _group_id(app: str, window: str) -> str:
    return hashlib.sha1(f"{app}|{window}".encode()).hexdigest()


def _event_name(tpl: Template, case: dict) -> str:
    target = tpl.target.format_map(case)
    return f"{tpl.prefix}: {target} in {tpl.app}" if tpl.prefix else f"{target} in {tpl.app}"


def _text(rng: random.Random, tpl: Template, case: dict, window: str) -> str:
    # Noisy free text: sometimes the window title, sometimes a field value or note, sometimes
    # something unrelated, often nothing.
    r = rng.random()
    if r < 0.22:
        return ""
    if r < 0.50:
        return window
    if r < 0.82 and tpl.notes:
        note = rng.choice(tpl.notes).format_map(case)
        return f"{note} | {window}" if rng.random() < 0.3 else note
    return rng.choice(GENERIC_NOTES)


def _timestamp(secs: int, tie: int) -> str:
    t = _FIRST_DAY + timedelta(seconds=secs)
    frac = f".{tie:03d}000" if tie else ""
    return f"{t:%Y-%m-%d %H:%M:%S}{frac}+05:00"


def _session_rows(rng: random.Random, sid: int, start: int, events: list[_Ev],
                  step_scale: dict[str, float]) -> list[list]:
    """One row per event in true order: the CSV columns, then seq, screen and window (kept
    for the screenshot and dropped before writing)."""
    rows = []
    secs, tie = start, 0
    for seq, (tpl, step, case) in enumerate(events):
        if seq:
            if rng.random() < P_TIE:
                tie += 1
            else:
                tie = 0
                gap = rng.lognormvariate(math.log(4.4 if tpl.prefix == "Write" else 3.7), .65)
                secs += min(max(round(gap), 1), 10)
        window = tpl.window.format_map(case)
        if rng.random() < P_MISSING_DURATION:
            duration = float("nan")
        else:
            duration = round(rng.lognormvariate(
                math.log(tpl.dur * step_scale.get(step, 1.0)), .5), 3)
        rows.append([_timestamp(secs, tie), sid, _event_name(tpl, case),
                     _group_id(tpl.app, window), tpl.app, _text(rng, tpl, case, window),
                     duration, step, seq, tpl.screen, window])
    return rows


def _file_order(rng: random.Random, rows: list[list]) -> list[list]:
    """Perturb the order rows are written in: the recorder does not always agree with the
    clock, most often inside one second."""
    rows = list(rows)
    j = 0
    while j < len(rows) - 1:
        tied = rows[j + 1][0][19:20] == "."
        if rng.random() < (P_SWAP_TIE if tied else P_SWAP):
            rows[j], rows[j + 1] = rows[j + 1], rows[j]
            j += 2
        else:
            j += 1
    return rows


def _riffle(rng: random.Random, a: list, b: list) -> list:
    out, i, k = [], 0, 0
    while i < len(a) or k < len(b):
        if k >= len(b) or (i < len(a) and rng.random() < 0.5):
            out.append(a[i])
            i += 1
        else:
            out.append(b[k])
            k += 1
    return out


# --------------------------------------------------------------------------------------
# Screenshots
# --------------------------------------------------------------------------------------

class _Renderer:
    """Draws a small, noisy screenshot of an app window. Layout and colours depend on the
    app and the screen kind; the account-maintenance and no-change screens carry distinct
    banners (which noise sometimes hides)."""

    W, H = 128, 96
    APP_COLORS = {
        "Chrome": (66, 133, 244), "Excel": (33, 115, 70), "Terminal": (60, 60, 60),
        "Acrobat Reader": (200, 30, 30), "dpdhl.sharepoint": (3, 120, 124),
        "ibbr-global.dhl": (212, 5, 17), "Outlook": (0, 114, 198), "Explorer": (240, 200, 60),
        "Teams": (98, 100, 167),
    }

    def __init__(self):
        from PIL import ImageFont
        self.font = ImageFont.load_default(size=8)

    def render(self, rng: random.Random, app: str, window: str, screen: str):
        from PIL import Image, ImageDraw
        W, H = self.W, self.H
        bg = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in (0, 90, 160))
        img = Image.new("RGB", (W, H), bg)
        d = ImageDraw.Draw(img)
        x0, y0 = rng.randint(0, 6), rng.randint(0, 6)
        x1, y1 = W - 1 - rng.randint(0, 6), H - 1 - rng.randint(0, 8)
        color = tuple(min(255, max(0, c + rng.randint(-10, 10)))
                      for c in self.APP_COLORS.get(app, (128, 128, 128)))
        d.rectangle((x0, y0, x1, y1), fill=(245, 245, 245), outline=color)
        d.rectangle((x0, y0, x1, y0 + 10), fill=color)
        d.text((x0 + 2, y0 + 1), window[:26], fill=(255, 255, 255), font=self.font)
        box = (x0 + 1, y0 + 11, x1 - 1, y1 - 1)
        getattr(self, "_" + screen)(rng, d, box)
        if rng.random() < 0.15:   # a notification toast over part of the window
            px, py = rng.randint(0, W - 40), rng.randint(0, H - 16)
            d.rectangle((px, py, px + 40, py + 16), fill=(50, 50, 50), outline=(200, 200, 200))
        for _ in range(rng.randint(0, 12)):   # speckle
            d.point((rng.randrange(W), rng.randrange(H)),
                    fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        return img

    @staticmethod
    def _lines(rng, d, box, color, top=0, step=7, left=3):
        x0, y0, x1, y1 = box
        y = y0 + 3 + top
        while y < y1 - 3:
            d.line((x0 + left, y, x0 + left + rng.randint(8, max(9, x1 - x0 - 8)), y),
                   fill=color, width=2)
            y += step

    def _terminal(self, rng, d, box):
        d.rectangle(box, fill=(8, 8, 8))
        self._lines(rng, d, box, (40, 220, 60))

    def _terminal_banner(self, rng, d, box, colour, title):
        """A terminal screen under a coloured title bar (nine screens in ten show the bar)."""
        self._terminal(rng, d, box)
        x0, y0, x1, _ = box
        if rng.random() < 0.9:
            d.rectangle((x0, y0, x1, y0 + 10), fill=colour)
            d.text((x0 + 2, y0 + 1), title, fill=(0, 0, 0), font=self.font)

    def _terminal_update(self, rng, d, box):
        self._terminal_banner(rng, d, box, (230, 200, 0), "ACCOUNT MAINT")
        x0, y0, x1, y1 = box
        for k in range(3):   # highlighted input fields
            y = y0 + 16 + k * 12 + rng.randint(-1, 1)
            d.rectangle((x0 + 30, y, x1 - 10, y + 8), outline=(255, 220, 0))

    def _terminal_nochange(self, rng, d, box):
        self._terminal_banner(rng, d, box, (0, 170, 200), "NO CHANGE")
        x0, y0, x1, y1 = box
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2 + rng.randint(-3, 3)
        d.rectangle((cx - 22, cy - 8, cx + 22, cy + 8), fill=(20, 20, 80), outline=(0, 170, 200))
        d.text((cx - 8, cy - 5), "Y/N", fill=(255, 255, 255), font=self.font)

    def _form(self, rng, d, box):
        x0, y0, x1, y1 = box
        y = y0 + 4
        while y < y1 - 12:
            d.rectangle((x0 + 3, y, x0 + 28, y + 5), fill=(170, 170, 170))
            d.rectangle((x0 + 32, y - 1, x1 - 4 - rng.randint(0, 30), y + 6),
                        fill=(255, 255, 255), outline=(120, 120, 120))
            y += 11
        d.rectangle((x1 - 26, y1 - 10, x1 - 4, y1 - 3), fill=(66, 133, 244))

    def _list(self, rng, d, box):
        x0, y0, x1, y1 = box
        d.rectangle((x0, y0, x1, y0 + 7), fill=(3, 120, 124))
        for k, y in enumerate(range(y0 + 10, y1 - 5, 8)):
            if k % 2:
                d.rectangle((x0, y, x1, y + 7), fill=(225, 225, 225))
            d.rectangle((x0 + 3, y + 2, x0 + 7, y + 6), fill=(33, 115, 70))
            d.line((x0 + 11, y + 4, x0 + 11 + rng.randint(15, 70), y + 4), fill=(80, 80, 80))

    def _grid(self, rng, d, box):
        x0, y0, x1, y1 = box
        d.rectangle((x0, y0, x1, y0 + 6), fill=(33, 115, 70))
        for x in range(x0, x1, 16):
            d.line((x, y0 + 6, x, y1), fill=(200, 200, 200))
        for y in range(y0 + 6, y1, 7):
            d.line((x0, y, x1, y), fill=(200, 200, 200))
        cx, cy = x0 + 16 * rng.randint(0, 5), y0 + 6 + 7 * rng.randint(1, 8)
        d.rectangle((cx, cy, cx + 16, cy + 7), outline=(16, 124, 16), width=2)

    def _pdf(self, rng, d, box):
        x0, y0, x1, y1 = box
        d.rectangle(box, fill=(90, 90, 90))
        page = (x0 + 18, y0 + 3, x1 - 18, y1)
        d.rectangle(page, fill=(255, 255, 255))
        self._lines(rng, d, page, (120, 120, 120), step=5)

    def _mail(self, rng, d, box):
        x0, y0, x1, y1 = box
        d.rectangle((x0, y0, x0 + 22, y1), fill=(220, 230, 245))
        for y in range(y0 + 3, y1 - 6, 9):
            d.rectangle((x0 + 26, y, x1 - 3, y + 7), outline=(200, 200, 200))
            d.line((x0 + 28, y + 3, x0 + 28 + rng.randint(20, 60), y + 3), fill=(0, 0, 0))

    def _compose(self, rng, d, box):
        x0, y0, x1, y1 = box
        for k in range(2):   # To: and Subject:
            y = y0 + 3 + 9 * k
            d.rectangle((x0 + 3, y, x1 - 3, y + 6), outline=(150, 150, 150))
        self._lines(rng, d, (x0, y0 + 20, x1, y1 - 10), (60, 60, 60), step=6)
        d.rectangle((x0 + 3, y1 - 9, x0 + 23, y1 - 3), fill=(0, 114, 198))

    def _web(self, rng, d, box):
        x0, y0, x1, y1 = box
        for _ in range(rng.randint(2, 5)):
            a, b = rng.randint(x0, x1 - 10), rng.randint(y0, y1 - 10)
            d.rectangle((a, b, min(x1, a + rng.randint(10, 50)), min(y1, b + rng.randint(6, 30))),
                        fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))

    def _desktop(self, rng, d, box):
        x0, y0, x1, y1 = box
        d.rectangle(box, fill=(20, 60, 120))
        for k in range(rng.randint(3, 8)):
            x, y = x0 + 4 + (k // 4) * 14, y0 + 4 + (k % 4) * 14
            d.rectangle((x, y, x + 8, y + 8), fill=(240, 200, 60))
        d.rectangle((x0, y1 - 6, x1, y1), fill=(30, 30, 30))


# --------------------------------------------------------------------------------------
# The window-focus profile: working days of one office worker, one focus change a row
# --------------------------------------------------------------------------------------
#
# A session is a working day. The day is planned top-down: its size, the ~7 activities
# worked on, and how many events each gets (so activity shares hold for any seed); then the
# day is cut into runs of one activity, interleaved, and each run is walked window by window.
# A run keeps a small working set of windows it switches between, opens new ones now and
# then, and drops into shared windows (inbox, desktop, search page, chats with colleagues)
# that carry no word of the activity: those are labelled with the run they sit in.
# The constants and window weights were set by measuring the statistics that
# tests/trainer/test_generate.py checks against DATA.md; change them together.

WF_COLUMNS = ["session_id", "timestamp", "event_name", "step_name", "target_app", "text",
              "duration_s"]
WF_DEFAULT_DAYS = 20
_WF_FIRST_DAY = datetime(2024, 9, 2)   # a Monday; days are the working days from here
_WF_USER = "m.keller@northwind.example"
# Day size in events: a log-normal, wider below the median (half days, meeting days) than
# above it, sampled at stratified quantiles so every seed gets the same spread of days.
_WF_DAY_MEDIAN, _WF_DAY_SIGMA_LO, _WF_DAY_SIGMA_HI = 450, 0.73, 0.52
# How long a window keeps focus: mostly seconds (so most events share their minute with the
# one before), sometimes about a minute, now and then long (reading, a call, a meeting).
_WF_P_LONG, _WF_P_MID = 0.07, 0.15
_WF_P_WORKING_SET = 0.45   # a run goes back to a window it already has open
_WF_RECENT = 2             # ...which is its first window or one of the last few it opened
_WF_P_DAY_POOL = 0.15      # a window it opens is one this activity used earlier today
_WF_P_BORROW = 0.25        # ...or one that belongs to a related activity
# window-focus-hard: the borrowing chance, and how much more often shared windows come up
# (an activity's chance of one is scaled, at most _WF_MAX_GENERIC)
_WF_HARD_P_BORROW, _WF_HARD_GENERIC, _WF_MAX_GENERIC = 0.6, 2.0, 0.9
_WF_P_NEW_THREAD = 0.5     # a mail thread / ticket drawn is a new one
_WF_THREAD_DAYS = 1.5      # mean working days a thread stays in use after it starts


@dataclass(frozen=True)
class Win:
    """A kind of window an activity opens, with a weight relative to the activity's other
    windows. `title` is a format string over the activity's words (see `_Fields`): fields
    such as `{n}`, `{o}`, `{q}` or `{date}` make most titles new, a title without them
    recurs. A `thread` title (a mail thread, a ticket) is minted once and then lives for a
    few days, so new ones keep appearing and old ones retire."""
    app: str
    title: str
    weight: float
    thread: bool = False


@dataclass(frozen=True)
class Activity:
    """One job activity (a label). `share` is its percentage of all events; it is worked on
    only in the fraction [start, end) of the recorded days. Word lists under keys `t` and `x`
    slide over time (early days use the first words, late days the last), so an activity's
    vocabulary drifts; `related` activities lend it windows now and then."""
    name: str
    share: float
    windows: tuple[Win, ...]
    words: tuple[tuple[str, tuple[str, ...]], ...] = ()
    related: tuple[str, ...] = ()
    start: float = 0.0
    end: float = 1.0
    generic: float = 0.24  # chance an event inside a run is a shared window
    daily: bool = False    # worked on every day of its period (a new hire's first days)


def _win(row: list) -> Win:
    """One window row of the catalogue: [app, title, weight] or [app, title, weight, thread]."""
    app, title, weight, *flag = row
    if flag not in ([], ["thread"]):
        raise ConfigError(f"{_CATALOGUE_PATH.name}: window {row!r}: the fourth item can only be 'thread'")
    return Win(app, title, weight, thread=bool(flag))


def _activity(a: dict) -> Activity:
    unknown = set(a) - {"name", "share", "windows", "words", "related", "start", "end", "generic", "daily"}
    if unknown:
        raise ConfigError(f"{_CATALOGUE_PATH.name}: activity {a.get('name')!r}: unknown key(s) {sorted(unknown)}")
    return Activity(a["name"], a["share"], tuple(_win(w) for w in a["windows"]),
                    tuple((k, tuple(v)) for k, v in a.get("words", {}).items()), tuple(a.get("related", ())),
                    **{k: a[k] for k in ("start", "end", "generic", "daily") if k in a})


# The catalogue is data: the shared windows, the start pages and the 28 activities are in
# window_focus.yaml beside this file (read once, at import).
_CATALOGUE_PATH = Path(__file__).with_name("window_focus.yaml")
_CATALOGUE = yaml.load(_CATALOGUE_PATH.read_text(encoding="utf-8"),
                       Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
TEAM = tuple(_CATALOGUE["team"])            # the worker's own team: chats in shared windows
WF_SHARED = tuple(_win(row) for row in _CATALOGUE["shared"])
ACTIVITIES = tuple(_activity(a) for a in _CATALOGUE["activities"])

ACTIVITY_OF = {a.name: a for a in ACTIVITIES}
# What makes one mail, page or note differ from the next about the same topic.
_QUALIFIERS = ("follow-up", "next steps", "open points", "for review", "action required",
               "minutes", "draft", "v2", "comments", "feedback", "question", "update",
               "status", "summary", "timeline", "proposal", "figures", "call notes",
               "approval", "reminder", "options", "decision", "input needed", "planning",
               "overview", "deadline", "clarification", "alignment", "numbers", "prep",
               "escalation", "quick check", "final", "corrections", "template", "issues",
               "dependencies", "risks", "actuals", "assumptions", "handout", "recap",
               "invitation", "agenda", "priorities", "change log", "sign-off", "data")
# How-to words any activity may search for.
_HOWTO = ("excel", "vlookup", "pivot table", "conditional formatting", "powerpoint",
          "align shapes", "slide master", "word", "track changes", "table of contents",
          "outlook", "rules", "shared mailbox", "teams", "share screen", "onedrive", "sync",
          "pdf", "merge", "compress", "convert", "shortcut", "windows 11", "screenshot",
          "date format", "formula", "chart", "font", "sharepoint", "permissions", "calendar",
          "time zone", "print", "signature", "meeting notes", "out of office", "zoom")
_SEARCH_MODS = ("", "", "how to", "template", "example", "best practice", "definition", "2024",
                "vs", "meaning", "checklist", "pdf", "guide", "tips")


class _Fields(dict):
    """A `format_map` mapping that draws a word the first time a title asks for a field."""

    def __init__(self, rng: random.Random, act: Activity | None, day: int, days: int,
                 date: datetime):
        super().__init__()
        self.rng, self.act, self.day, self.days, self.date = rng, act, day, days, date

    def _slide(self, words: tuple[str, ...]) -> tuple[str, ...]:
        # The visible half of the list moves from its start to its end over the recording.
        k = max(2, math.ceil(len(words) / 2))
        if len(words) <= k:
            return words
        at = round(self.day / max(1, self.days - 1) * (len(words) - k))
        return words[at:at + k]

    def __missing__(self, key: str) -> str:
        rng, d = self.rng, self.date
        words = dict(self.act.words) if self.act else {}
        if key == "user":
            v = _WF_USER
        elif key == "col":
            v = rng.choice(TEAM)
        elif key == "date":
            v = f"{d:%Y-%m-%d}"
        elif key == "wk":
            v = str(d.isocalendar()[1])
        elif key == "mon":
            v = f"{d:%B}"
        elif key == "qtr":
            v = str((d.month - 1) // 3 + 1)
        elif key == "year":
            v = str(d.year)
        elif key == "v":
            v = str(1 + self.day // 4)
        elif key == "pre":
            v = rng.choice(("", "", "RE: ", "RE: ", "FW: ", "AW: "))
        elif key == "o":
            v = rng.choice(_QUALIFIERS)
        elif key == "n":
            v = str(rng.randrange(10000, 99999))
        elif key == "g" or (key == "q" and rng.random() < 0.4):
            picked = rng.sample(_HOWTO, rng.choice((1, 2, 2, 3)))
            v = " ".join(picked + [rng.choice(_SEARCH_MODS)]).strip()
        elif key == "q":
            pool = list(words.get("k", ())) + [w.lower() for w in self._slide(words.get("t", ()))]
            picked = rng.sample(pool, min(len(pool), rng.choice((1, 2, 2, 3))))
            v = " ".join(picked + [rng.choice(_SEARCH_MODS)]).strip()
        elif key in ("t", "x", "s"):
            v = rng.choice(self._slide(words[key]))
        else:
            v = rng.choice(words[key])
        self[key] = v
        return v


class _DayWalker:
    """Walks one day's runs window by window, keeping what the worker has open: each
    activity's windows used so far today, and the mail threads and tickets still alive."""

    def __init__(self, rng: random.Random, day: int, days: int, date: datetime,
                 threads: dict[tuple[str, int], list[list]], hard: bool = False):
        self.rng, self.day, self.days, self.date = rng, day, days, date
        self.p_borrow = _WF_HARD_P_BORROW if hard else _WF_P_BORROW
        self.generic_scale = _WF_HARD_GENERIC if hard else 1.0
        self.threads = threads          # (activity, window index) -> [[title, last day]]
        self.today: dict[str, list[tuple[str, str]]] = {}

    def _title(self, act: Activity, idx: int) -> tuple[str, str]:
        win = act.windows[idx]
        if win.thread:
            key = (act.name, idx)
            live = [t for t in self.threads.get(key, ()) if t[1] >= self.day]
            if live and self.rng.random() >= _WF_P_NEW_THREAD:
                return self.rng.choice(live)[0], win.app
            title = win.title.format_map(_Fields(self.rng, act, self.day, self.days, self.date))
            # A thread stays in use for a few working days, then retires.
            life = min(int(self.rng.expovariate(1 / _WF_THREAD_DAYS)), 15)
            self.threads.setdefault(key, []).append([title, self.day + life])
            return title, win.app
        return win.title.format_map(_Fields(self.rng, act, self.day, self.days, self.date)), win.app

    def _open(self, act: Activity) -> tuple[str, str]:
        """A window the run opens that it does not have open yet."""
        rng = self.rng
        pool = self.today.get(act.name)
        if pool and rng.random() < _WF_P_DAY_POOL:
            return rng.choice(pool)
        src = act
        if act.related and rng.random() < self.p_borrow:
            src = ACTIVITY_OF[rng.choice(act.related)]
        idx = rng.choices(range(len(src.windows)), [w.weight for w in src.windows])[0]
        win = self._title(src, idx)
        self.today.setdefault(act.name, []).append(win)
        return win

    def _shared(self) -> tuple[str, str]:
        w = self.rng.choices(WF_SHARED, [w.weight for w in WF_SHARED])[0]
        return w.title.format_map(_Fields(self.rng, None, self.day, self.days, self.date)), w.app

    def run(self, act: Activity, length: int) -> list[tuple[str, str]]:
        rng = self.rng
        out: list[tuple[str, str]] = []
        # What the run switches between: the window it started in, and the last few it
        # opened (a search or a mail read in passing drops out of it again).
        working: list[tuple[str, str]] = []
        generic = min(_WF_MAX_GENERIC, act.generic * self.generic_scale)
        for i in range(length):
            # A shared window opens a run only now and then (the worker switched over via
            # the inbox or the desktop); then only what follows says which run it is.
            if rng.random() < (generic if i else generic * 0.4 * (length > 1)):
                win = self._shared()
            elif working and rng.random() < _WF_P_WORKING_SET:
                choices = [w for w in working if w != out[-1]] or working
                win = rng.choice(choices)
            else:
                win = self._open(act)
                if win in working:
                    working.remove(win)
                working.append(win)
                if len(working) > 1 + _WF_RECENT:
                    del working[1]
            out.append(win)
        return out


def _wf_working_days(n: int) -> list[datetime]:
    days, d = [], _WF_FIRST_DAY
    while len(days) < n:
        if d.weekday() < 5:
            days.append(d)
        d += timedelta(days=1)
    return days


def _wf_day_sizes(rng: random.Random, days: int) -> list[int]:
    nd = NormalDist()
    sizes = []
    for k in range(days):
        z = nd.inv_cdf((k + rng.uniform(0.25, 0.75)) / days)
        sigma = _WF_DAY_SIGMA_LO if z < 0 else _WF_DAY_SIGMA_HI
        # Capped so that a long recording's busiest day still fits in a working day.
        sizes.append(min(1500, max(40, round(_WF_DAY_MEDIAN * math.exp(z * sigma)))))
    rng.shuffle(sizes)
    return sizes


def _wf_sample(rng: random.Random, items: list, weights: list[float], k: int) -> list:
    """k distinct items, drawn with probability proportional to weight (Efraimidis-Spirakis)."""
    keys = sorted(((rng.random() ** (1 / w), i) for i, w in enumerate(weights)), reverse=True)
    return [items[i] for _, i in keys[:k]]


def _wf_plan(rng: random.Random, sizes: list[int]) -> list[dict[str, int]]:
    """How many events each activity gets on each day: about 7 activities a day, each
    activity only inside its active period, and each activity's total at its share."""
    days, total = len(sizes), sum(sizes)
    shares = sum(a.share for a in ACTIVITIES)
    active = [[a for a in ACTIVITIES if a.start <= (d + 0.5) / days < a.end]
              for d in range(days)]
    chosen: list[list[Activity]] = []
    for d in range(days):
        k = round(rng.gauss(7 + 2 * math.log(sizes[d] / _WF_DAY_MEDIAN), 1.0))
        k = max(3, min(11, len(active[d]), k))
        daily = [a for a in active[d] if a.daily]
        rest = [a for a in active[d] if not a.daily]
        # An activity confined to a few days is worked on more of them.
        weights = [(a.share / (a.end - a.start)) ** 0.6 for a in rest]
        chosen.append(daily + _wf_sample(rng, rest, weights, max(0, k - len(daily))))
    for a in ACTIVITIES:   # every activity is worked on at least once
        if not any(a in c for c in chosen):
            days_of_a = [d for d in range(days) if a in active[d]]
            if days_of_a:
                chosen[rng.choice(days_of_a)].append(a)
    # Iterative proportional fitting: rows to the activity totals, columns to the day sizes.
    cell = {(a.name, d): rng.gammavariate(1.5, 1.0) for d in range(days) for a in chosen[d]}
    for _ in range(80):
        row: dict[str, float] = {}
        for (name, _d), v in cell.items():
            row[name] = row.get(name, 0.0) + v
        for key in cell:
            cell[key] *= ACTIVITY_OF[key[0]].share / shares * total / row[key[0]]
        col = [0.0] * days
        for (_name, d), v in cell.items():
            col[d] += v
        for key in cell:
            cell[key] *= sizes[key[1]] / col[key[1]]
    plan = []
    for d in range(days):
        want = {a.name: cell[(a.name, d)] for a in chosen[d]}
        counts = {n: max(1, math.floor(v)) for n, v in want.items()}
        # Largest remainder, so the day keeps its size.
        order = sorted(want, key=lambda n: want[n] - math.floor(want[n]), reverse=True)
        i = 0
        while sum(counts.values()) < sizes[d]:
            counts[order[i % len(order)]] += 1
            i += 1
        plan.append(counts)
    return plan


def _wf_run_length(rng: random.Random) -> int:
    if rng.random() < 0.55:   # an interruption: a chat, a quick look at something else
        return 1 + int(rng.lognormvariate(math.log(2.0), 0.7))
    return max(3, round(rng.lognormvariate(math.log(70), 0.9)))


def _wf_runs(rng: random.Random, counts: dict[str, int]) -> list[tuple[str, int]]:
    """Cut each activity's events into runs and interleave them so that no two neighbouring
    runs have the same activity (when that cannot be avoided, they merge)."""
    pieces: dict[str, list[int]] = {}
    for name, n in counts.items():
        left = n
        while left > 0:
            k = min(left, _wf_run_length(rng))
            pieces.setdefault(name, []).append(k)
            left -= k
        rng.shuffle(pieces[name])
    runs: list[tuple[str, int]] = []
    triage = "Email triage"
    if triage in pieces and rng.random() < 0.7:   # the day often starts in the inbox
        runs.append((triage, pieces[triage].pop()))
    while any(pieces.values()):
        last = runs[-1][0] if runs else None
        names = [n for n, p in pieces.items() if p and n != last]
        if not names:   # only the current activity has runs left: they join it
            runs[-1] = (last, runs[-1][1] + sum(pieces[last]))
            pieces[last] = []
            break
        name = rng.choices(names, [len(pieces[n]) for n in names])[0]
        runs.append((name, pieces[name].pop()))
    return runs


def _wf_times(rng: random.Random, n: int) -> list[int]:
    """Seconds since midnight at which each of the day's n events takes focus, and the
    moment the last one loses it (n + 1 values)."""
    # A longer day for more events; the long dwells fill what the quick switching leaves.
    hours = 5.0 + 4.5 * min(1.0, n / 1000)
    quick = n * (1 - _WF_P_LONG - _WF_P_MID) * 7.5 + n * _WF_P_MID * 57
    long_mean = max(150.0, (hours * 3600 - quick) / max(1.0, n * _WF_P_LONG))
    t = 8 * 3600 + rng.randrange(-15 * 60, 75 * 60)
    lunch = 12 * 3600 + rng.randrange(0, 75 * 60)
    out = []
    for _ in range(n):
        out.append(t)
        r = rng.random()
        if r < _WF_P_LONG:
            dwell = rng.lognormvariate(math.log(long_mean) - 0.18, 0.6)
        elif r < _WF_P_LONG + _WF_P_MID:
            dwell = rng.uniform(35, 80)
        else:
            dwell = min(55.0, rng.lognormvariate(math.log(5), 0.9))
        t += round(dwell)
        if lunch and t >= lunch:
            t += rng.randrange(25 * 60, 55 * 60)
            lunch = 0
    out.append(t)
    return out


def _generate_window_focus(days: int, seed: int, out: Path, progress: bool, hard: bool = False) -> dict:
    plan_rng = random.Random(f"tagger-generate:window-focus:{seed}:plan")
    sizes = _wf_day_sizes(plan_rng, days)
    plan = _wf_plan(plan_rng, sizes)
    dates = _wf_working_days(days)
    threads: dict[tuple[str, int], list[list]] = {}
    rows = []
    for d in tqdm(range(days), disable=not progress, file=sys.stderr, desc="days", unit="day"):
        rng = random.Random(f"tagger-generate:window-focus:{seed}:day:{d}")
        walker = _DayWalker(rng, d, days, dates[d], threads, hard)
        events: list[tuple[str, str, str]] = []
        for name, length in _wf_runs(rng, plan[d]):
            run = walker.run(ACTIVITY_OF[name], length)
            events.extend((title, app, name) for title, app in run)
        times = _wf_times(rng, len(events))
        sid = f"wf{seed}-{dates[d]:%Y-%m-%d}"
        for i, (title, app, name) in enumerate(events):
            # One-minute resolution; a focus lasts until the next one, at the same resolution.
            minute, until = times[i] // 60, times[i + 1] // 60
            stamp = dates[d] + timedelta(minutes=minute)
            rows.append((sid, f"{stamp:%Y-%m-%dT%H:%M:%S}", f"Focus: {title} in {app}", name,
                         app, title, (until - minute) * 60))
    df = pd.DataFrame(rows, columns=WF_COLUMNS)
    df.to_csv(out, index=False)
    counts = df["step_name"].value_counts()
    return {"events": len(df), "sessions": days, "path": str(out),
            "steps": {a.name: int(counts.get(a.name, 0)) for a in ACTIVITIES}}


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

# Session ids of seed s lie in [s * SEED_ID_STRIDE + FIRST_SESSION_ID, (s + 1) * SEED_ID_STRIDE).
FIRST_SESSION_ID = 10000
SEED_ID_STRIDE = 10_000_000


def _posix_relpath(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def generate(sessions: int | None, seed: int, out: str | Path,
             images_dir: str | Path | None = None, progress: bool = False,
             profile: str = "default") -> dict:
    """Write a labelled log of `sessions` sessions to `out` (CSV) and return stats.

    `profile` is one of `PROFILES`. The default profile's columns are `COLUMNS`, plus
    `screenshot_path` (relative to the CSV's folder) when `images_dir` is given, in which
    case one PNG per event is written there. `window-focus` writes `WF_COLUMNS`, one session
    per working day (`sessions=None`: 20 days), and has no screenshots. The same seed gives
    a byte-identical CSV and identical images; different seeds never share a session id.
    """
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    if sessions is None:
        sessions = WF_DEFAULT_DAYS if profile.startswith("window-focus") else 1000
    if sessions < 0:
        raise ConfigError(f"sessions must be >= 0, got {sessions}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if 3 * sessions >= SEED_ID_STRIDE - FIRST_SESSION_ID:
        raise ConfigError(f"at most {(SEED_ID_STRIDE - FIRST_SESSION_ID) // 3 - 1} sessions per seed, "
                         f"got {sessions}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if profile.startswith("window-focus"):
        if images_dir is not None:
            raise ConfigError(f"the {profile} profile has no screenshots; drop --images")
        return _generate_window_focus(sessions, seed, out, progress, hard=profile == "window-focus-hard")
    renderer = None
    if images_dir is not None:
        images_dir = Path(images_dir)
        images_dir.mkdir(parents=True, exist_ok=True)
        renderer = _Renderer()
    step_scale = {name: step.dur_scale for name, step in STEP_OF.items()}
    step_scale[OUT_OF_PROCESS] = 1.0

    # Each session draws from its own stream, so sessions do not depend on one another.
    order_rng = random.Random(f"tagger-generate:{seed}:order")
    starts = []
    for i in range(sessions):
        start, week = _session_start(random.Random(f"tagger-generate:{seed}:start:{i}"))
        starts.append((start, i, week))
    starts.sort()   # session ids grow with start time, as a recorder would assign them
    # Each seed has its own block of ids, so logs made with different seeds (a training set, a
    # test set, "new" data) can be published to one topic without mixing sessions.
    sid = FIRST_SESSION_ID + seed * SEED_ID_STRIDE
    per_session: list[list[list]] = []
    for start, i, week in tqdm(starts, total=sessions, disable=not progress, file=sys.stderr,
                               desc="sessions", unit="session"):
        sid += order_rng.randint(1, 3)
        rng = random.Random(f"tagger-generate:{seed}:session:{i}")
        events = _walk_session(rng, week)
        while not events:   # every slot of a short walk can come up empty; walk again
            events = _walk_session(rng, week)
        rows = _session_rows(rng, sid, start, events, step_scale)
        if renderer is not None:
            for row in rows:
                app, seq, screen, window = row[4], row[8], row[9], row[10]
                name = f"{sid:06d}_{seq:03d}.png"
                # Own stream per picture: images on or off, the CSV draws stay the same.
                img_rng = random.Random(f"tagger-generate:{seed}:image:{sid}:{seq}")
                renderer.render(img_rng, app, window, screen).save(
                    images_dir / name, compress_level=1)
                row.append(_posix_relpath(images_dir / name, out.parent))
        per_session.append(_file_order(rng, rows))

    ordered: list[list] = []
    k = 0
    while k < len(per_session):
        if k + 1 < len(per_session) and order_rng.random() < P_INTERLEAVE:
            ordered.extend(_riffle(order_rng, per_session[k], per_session[k + 1]))
            k += 2
        else:
            ordered.extend(per_session[k])
            k += 1

    columns = COLUMNS + ["_seq", "_screen", "_window"]
    if renderer is not None:
        columns.append(IMAGE_COLUMN)
    df = pd.DataFrame(ordered, columns=columns).drop(columns=["_seq", "_screen", "_window"])
    df.to_csv(out, index=False)
    counts = df["step_name"].value_counts()
    stats = {"events": len(df), "sessions": sessions,
             "steps": {s: int(counts.get(s, 0)) for s in STEPS}, "path": str(out)}
    if renderer is not None:
        stats["images"] = len(df)
    return stats
