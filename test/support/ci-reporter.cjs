// Mocha's spec reporter, plus one closing line "N passed, N failed" (and pending as skipped).
// With SLUICE_CI_COUNTS_FILE set (CI runs the suite once per Node version and prints the totals
// itself), it writes "<passed> <failed> <skipped>" to that file instead, and closes with
// "node vX.Y.Z: passed N, failed N", which does not read as the final total.
"use strict";
const fs = require("node:fs");
const Mocha = require("mocha");
const { EVENT_RUN_END, EVENT_TEST_PASS, EVENT_TEST_FAIL, EVENT_TEST_PENDING } = Mocha.Runner.constants;

class CiReporter extends Mocha.reporters.Spec {
  constructor(runner, options) {
    super(runner, options);
    let passed = 0;
    let failed = 0;
    let skipped = 0;
    runner.on(EVENT_TEST_PASS, () => passed++);
    runner.on(EVENT_TEST_FAIL, () => failed++);
    runner.on(EVENT_TEST_PENDING, () => skipped++);
    runner.once(EVENT_RUN_END, () => {
      // Registered after the spec reporter's epilogue, so it prints last.
      const countsFile = process.env.SLUICE_CI_COUNTS_FILE;
      if (countsFile) {
        fs.writeFileSync(countsFile, `${passed} ${failed} ${skipped}\n`);
        process.stdout.write(`\nnode ${process.version}: passed ${passed}, failed ${failed}${skipped ? `, skipped ${skipped}` : ""}\n`);
        return;
      }
      process.stdout.write(`\n${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}\n`);
    });
  }
}
module.exports = CiReporter;
