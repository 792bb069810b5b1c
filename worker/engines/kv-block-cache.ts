/**
 * The KV cache of a simulated LLM device, in blocks of tokens: the prefix blocks of the prompts
 * it has seen (least recently used evicted first, never while a running sequence uses them) and
 * the tokens each running sequence holds on its own (the end of its prompt and its output).
 */

interface Block {
  /** Running sequences using the block. */
  refs: number;
}

export class KvBlockCache {
  /** Blocks in least-recently-used order (a Map keeps insertion order; a touch re-inserts). */
  private readonly blocks = new Map<string, Block>();
  private privateTokens = 0;

  constructor(
    /** Capacity in tokens. */
    readonly capacityTokens: number,
    /** Tokens per block. */
    readonly blockTokens: number,
  ) {}

  /** Tokens in use: every cached block plus what running sequences hold of their own. */
  get usedTokens(): number {
    return this.blocks.size * this.blockTokens + this.privateTokens;
  }

  /** Number of leading `hashes` held (a prefix ends at the first block missing). */
  cachedPrefix(hashes: readonly string[]): number {
    let n = 0;
    while (n < hashes.length && this.blocks.has(hashes[n]!)) n++;
    return n;
  }

  /**
   * Takes room for a sequence: its prompt blocks (shared, pinned while it runs) and
   * `ownTokens` of its own, evicting unpinned blocks (least recently used first) as needed.
   * Returns false, changing nothing, when it does not fit now.
   */
  admit(hashes: readonly string[], ownTokens: number): boolean {
    const missing = hashes.filter((h) => !this.blocks.has(h)).length;
    const need = missing * this.blockTokens + ownTokens;
    let free = this.capacityTokens - this.usedTokens;
    if (free < need) {
      const pinned = new Set(hashes);
      let evictable = 0;
      for (const [h, b] of this.blocks) if (b.refs === 0 && !pinned.has(h)) evictable += this.blockTokens;
      if (free + evictable < need) return false;
      for (const [h, b] of this.blocks) {
        if (free >= need) break;
        if (b.refs === 0 && !pinned.has(h)) {
          this.blocks.delete(h);
          free += this.blockTokens;
        }
      }
    }
    for (const h of hashes) {
      const b = this.blocks.get(h) ?? { refs: 0 };
      b.refs++;
      this.blocks.delete(h);
      this.blocks.set(h, b);
    }
    this.privateTokens += ownTokens;
    return true;
  }

  /** Gives back what {@link admit} took; the blocks stay cached for the next prompt. */
  release(hashes: readonly string[], ownTokens: number): void {
    for (const h of hashes) {
      const b = this.blocks.get(h);
      if (b && b.refs > 0) b.refs--;
    }
    this.privateTokens = Math.max(0, this.privateTokens - ownTokens);
  }

  /** Hashes of the blocks held, least recently used first. */
  hashes(): string[] {
    return [...this.blocks.keys()];
  }
}
