import {
  describeExact,
  dpDatasetIds,
  formatAmount,
  readBudget,
  readPrivacy
} from '../privacy';

const DP = {
  mode: 'dp',
  epsilon: 1.0,
  delta: 1e-7,
  epsilon_per_kernel: 0.5,
  unit: 'patient_id',
  max_contributions: 1,
  public: ['row_count'],
  bounds: { age: [0, 120] }
};

const REPORT = {
  dataset_id: 'admissions',
  status: 'ok',
  broker: 'http://127.0.0.1:8800',
  epsilon: 1.0,
  delta: 1e-7,
  epsilon_spent: 0.25,
  epsilon_remaining: 0.75,
  delta_spent: 0,
  delta_remaining: 1e-7,
  charges: 1
};

describe('readPrivacy', () => {
  it('reads the canonical dp table', () => {
    expect(readPrivacy(DP)).toEqual({
      mode: 'dp',
      epsilon: 1.0,
      delta: 1e-7,
      epsilon_per_kernel: 0.5,
      unit: 'patient_id',
      max_contributions: 1,
      public: ['row_count']
    });
  });

  it('reads exact mode with its release rules', () => {
    const exact = readPrivacy({
      mode: 'exact',
      min_group_size: 10,
      difference_checks: false
    });
    expect(exact).toEqual({
      mode: 'exact',
      min_group_size: 10,
      difference_checks: false
    });
    expect(exact?.mode === 'exact' && describeExact(exact)).toBe(
      'exact (minimum group size 10, difference checks off)'
    );
  });

  it.each([
    null,
    'dp',
    { mode: 'laplace' },
    { ...DP, epsilon: -1 },
    { ...DP, epsilon: 'one' },
    { ...DP, unit: 3 },
    { mode: 'exact', min_group_size: 10 }
  ])('refuses %p', value => {
    expect(readPrivacy(value)).toBeNull();
  });
});

describe('readBudget', () => {
  it('accepts a report about the dataset asked for', () => {
    expect(readBudget('admissions', REPORT)).toEqual(REPORT);
  });

  it('passes on the server’s reason when the budget is unavailable', () => {
    expect(
      readBudget('admissions', {
        dataset_id: 'admissions',
        status: 'unavailable',
        broker: null,
        reason: 'the broker did not answer within 3 s'
      })
    ).toEqual({
      dataset_id: 'admissions',
      status: 'unavailable',
      broker: null,
      reason: 'the broker did not answer within 3 s'
    });
  });

  it('never shows a report about another dataset or of the wrong shape', () => {
    expect(readBudget('visits', REPORT)).toMatchObject({
      status: 'unavailable',
      reason: 'the server reported a budget for another dataset'
    });
    expect(
      readBudget('admissions', { ...REPORT, epsilon_remaining: NaN })
    ).toMatchObject({ status: 'unavailable' });
    expect(readBudget('admissions', { ...REPORT, charges: 0.5 })).toMatchObject(
      { status: 'unavailable' }
    );
    expect(readBudget('admissions', undefined)).toMatchObject({
      status: 'unavailable',
      reason: 'the server reported no budget for this dataset'
    });
  });
});

describe('dpDatasetIds', () => {
  it('lists only the datasets in dp mode', () => {
    expect(
      dpDatasetIds([
        { id: 'a', privacy: readPrivacy(DP) },
        {
          id: 'b',
          privacy: { mode: 'exact', min_group_size: 5, difference_checks: true }
        },
        { id: 'c', privacy: null }
      ])
    ).toEqual(['a']);
  });
});

describe('formatAmount', () => {
  it('writes amounts as an owner would', () => {
    expect(formatAmount(0)).toBe('0');
    expect(formatAmount(0.1 + 0.2)).toBe('0.3');
    expect(formatAmount(1e-7)).toBe('1e-7');
    expect(formatAmount(1e-6)).toBe('1e-6');
    expect(formatAmount(2.5e-4)).toBe('2.5e-4');
    expect(formatAmount(0.75)).toBe('0.75');
  });
});
