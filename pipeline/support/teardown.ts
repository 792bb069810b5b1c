/**
 * Teardowns run in reverse order of what they undo, every one of them even when some fail. A
 * start that fails half-way runs the teardowns of the steps that succeeded; a stop runs all.
 */
export class Teardowns {
  private readonly steps: Array<{ name: string; run: () => Promise<void> | void }> = [];

  /** Registers the undoing of a step that just succeeded. */
  add(name: string, run: () => Promise<void> | void): void {
    this.steps.push({ name, run });
  }

  /**
   * Runs every registered teardown, last registered first, once each; rejects after all ran
   * when any failed (with the one error, or an AggregateError naming each failed step).
   */
  async run(): Promise<void> {
    const errors: Error[] = [];
    for (let step = this.steps.pop(); step !== undefined; step = this.steps.pop()) {
      try {
        await step.run();
      } catch (err) {
        errors.push(new Error(`${step.name}: ${(err as Error)?.message ?? String(err)}`, { cause: err }));
      }
    }
    if (errors.length === 1) throw errors[0]!.cause instanceof Error ? errors[0]!.cause : errors[0]!;
    if (errors.length > 1) throw new AggregateError(errors, `${errors.length} teardowns failed: ${errors.map((e) => e.message).join("; ")}`);
  }
}
